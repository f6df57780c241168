// Command crosslang plays the Go side of the Go/Python mTLS seed through the sidecar.
//
//	crosslang client -target HOST:PORT -ca CA -cert CERT -key KEY [-server-name NAME]
//	    Calls kv.KV, adder.Adder and api.Metrics over mTLS (as a Go service would call
//	    the sidecar's ingress) and prints one JSON object: each call's gRPC code,
//	    message and reply. It exits 0 whatever the calls answer; the report says.
//
//	crosslang server -listen HOST:PORT -ca CA -cert CERT -key KEY
//	    Serves the same three services over TLS that requires and verifies a client
//	    certificate signed by CA, prints "listening on HOST:PORT" once it accepts, and
//	    adds the caller's verified common name to every metric as the label "caller".
//
//	crosslang health -target HOST:PORT -ca CA -cert CERT -key KEY [-server-name NAME]
//	        [-service NAME] [-watch N]
//	    Calls grpc.health.v1.Health/Check and prints "check STATUS" (or "check error
//	    CODE MESSAGE"); with -watch N, then calls Watch and prints "watch STATUS" for
//	    each status it receives, until N have come or the stream ends ("watch end CODE
//	    MESSAGE"). Each line is printed as it happens.
//
// It is built by tests/test_go.py and tests/test_grpc_health.py with grpc-go from
// Debian's packages.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"sidecar.demo/gen/adder"
	"sidecar.demo/gen/api"
	"sidecar.demo/gen/kv"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: crosslang client|server [flags]")
	}
	switch os.Args[1] {
	case "client":
		runClient(os.Args[2:])
	case "server":
		runServer(os.Args[2:])
	case "health":
		runHealth(os.Args[2:])
	default:
		fail("unknown command " + os.Args[1])
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "crosslang:", message)
	os.Exit(2)
}

type tlsFlags struct{ ca, cert, key *string }

func addTLSFlags(flags *flag.FlagSet) tlsFlags {
	return tlsFlags{
		ca:   flags.String("ca", "", "CA certificate (PEM) that signs the peer"),
		cert: flags.String("cert", "", "own certificate (PEM)"),
		key:  flags.String("key", "", "own private key (PEM)"),
	}
}

func (f tlsFlags) load() (tls.Certificate, *x509.CertPool) {
	if *f.ca == "" || *f.cert == "" || *f.key == "" {
		fail("-ca, -cert and -key are required")
	}
	own, err := tls.LoadX509KeyPair(*f.cert, *f.key)
	if err != nil {
		fail(err.Error())
	}
	caPEM, err := ioutil.ReadFile(*f.ca)
	if err != nil {
		fail(err.Error())
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		fail("no certificate in " + *f.ca)
	}
	return own, pool
}

// outcome is one call's result as the report shows it.
type outcome struct {
	Code    uint32      `json:"code"`
	Message string      `json:"message"`
	Reply   interface{} `json:"reply,omitempty"`
}

func result(reply interface{}, err error) outcome {
	if err != nil {
		s := status.Convert(err)
		return outcome{Code: uint32(s.Code()), Message: s.Message()}
	}
	return outcome{Code: uint32(codes.OK), Reply: reply}
}

func optional(value *string) interface{} {
	if value == nil {
		return nil
	}
	return *value
}

func runClient(arguments []string) {
	flags := flag.NewFlagSet("client", flag.ExitOnError)
	target := flags.String("target", "", "the sidecar's ingress, HOST:PORT")
	serverName := flags.String("server-name", "", "name the ingress certificate must carry")
	material := addTLSFlags(flags)
	flags.Parse(arguments)
	if *target == "" {
		fail("-target is required")
	}
	own, pool := material.load()
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{own},
		RootCAs:      pool,
		ServerName:   *serverName,
		MinVersion:   tls.VersionTLS12,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *target, grpc.WithTransportCredentials(creds))
	if err != nil {
		fail(err.Error())
	}
	defer conn.Close()
	store, adding, metrics := kv.NewKVClient(conn), adder.NewAdderClient(conn), api.NewMetricsClient(conn)

	report := map[string]outcome{}
	put, err := store.Put(ctx, &kv.PutRequest{Key: "language", Value: "go"})
	if err == nil {
		report["put"] = result(map[string]interface{}{"previous": optional(put.Previous)}, nil)
	} else {
		report["put"] = result(nil, err)
	}
	get, err := store.Get(ctx, &kv.GetRequest{Key: "language"})
	if err == nil {
		report["get"] = result(get.Value, nil)
	} else {
		report["get"] = result(nil, err)
	}
	deleted, err := store.Delete(ctx, &kv.DeleteRequest{Key: "language"})
	if err == nil {
		report["delete"] = result(map[string]interface{}{"previous": optional(deleted.Previous)}, nil)
	} else {
		report["delete"] = result(nil, err)
	}
	_, err = store.Get(ctx, &kv.GetRequest{Key: "language"})
	report["get_missing"] = result(nil, err)
	sum, err := adding.Add(ctx, &adder.AddRequest{A: 2, B: 40})
	if err == nil {
		report["add"] = result(sum.Sum, nil)
	} else {
		report["add"] = result(nil, err)
	}
	end := time.Now().UTC().Truncate(time.Minute)
	query, err := metrics.Query(ctx, &api.QueryMetricsRequest{
		MetricName: "cpu",
		Labels:     map[string]string{"host": "app", "lang": "go"},
		Start:      timestamppb.New(end.Add(-2 * time.Minute)),
		End:        timestamppb.New(end),
	})
	if err == nil {
		var samples []map[string]interface{}
		for _, metric := range query.Metrics {
			for _, pair := range metric.Values {
				samples = append(samples, map[string]interface{}{
					"name": metric.Name, "labels": metric.Labels,
					"time": pair.Time.AsTime().Format(time.RFC3339), "value": pair.Value,
				})
			}
		}
		report["metrics"] = result(samples, nil)
	} else {
		report["metrics"] = result(nil, err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(report); err != nil {
		fail(err.Error())
	}
}

// store is the in-memory key-value store of the Go server.
type store struct {
	kv.UnimplementedKVServer
	mu     sync.Mutex
	values map[string]string
}

func (s *store) Get(_ context.Context, request *kv.GetRequest) (*kv.GetReply, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	value, found := s.values[request.Key]
	if !found {
		return nil, status.Errorf(codes.NotFound, "no key %q", request.Key)
	}
	return &kv.GetReply{Value: value}, nil
}

func (s *store) Put(_ context.Context, request *kv.PutRequest) (*kv.PutReply, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	reply := &kv.PutReply{}
	if previous, found := s.values[request.Key]; found {
		reply.Previous = &previous
	}
	s.values[request.Key] = request.Value
	return reply, nil
}

func (s *store) Delete(_ context.Context, request *kv.DeleteRequest) (*kv.DeleteReply, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	reply := &kv.DeleteReply{}
	if previous, found := s.values[request.Key]; found {
		reply.Previous = &previous
		delete(s.values, request.Key)
	}
	return reply, nil
}

type adderServer struct{ adder.UnimplementedAdderServer }

func (adderServer) Add(_ context.Context, request *adder.AddRequest) (*adder.AddReply, error) {
	return &adder.AddReply{Sum: request.A + request.B}, nil
}

type metricsServer struct{ api.UnimplementedMetricsServer }

// maxSamples bounds a reply whatever the range asked for, as the Python app does.
const maxSamples = 1440

// callerName is the common name of the client certificate TLS verified for this call.
func callerName(ctx context.Context) string {
	caller, ok := peer.FromContext(ctx)
	if !ok {
		return ""
	}
	info, ok := caller.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 {
		return ""
	}
	return info.State.VerifiedChains[0][0].Subject.CommonName
}

func (metricsServer) Query(ctx context.Context, request *api.QueryMetricsRequest) (*api.QueryMetricsResponse, error) {
	if request.MetricName == "" {
		return nil, status.Error(codes.InvalidArgument, "metricName is required")
	}
	labels := map[string]string{"caller": callerName(ctx), "served_by": "go"}
	for key, value := range request.Labels {
		labels[key] = value
	}
	start, end := request.Start.AsTime(), request.End.AsTime()
	if end.Before(start) {
		return nil, status.Error(codes.InvalidArgument, "end is before start")
	}
	metric := &api.Metric{Name: request.MetricName, Labels: labels}
	for at := start; !at.After(end) && len(metric.Values) < maxSamples; at = at.Add(time.Minute) {
		metric.Values = append(metric.Values, &api.Metric_SamplePair{
			Time: timestamppb.New(at), Value: float64(at.Minute()),
		})
	}
	return &api.QueryMetricsResponse{Metrics: []*api.Metric{metric}}, nil
}

func runServer(arguments []string) {
	flags := flag.NewFlagSet("server", flag.ExitOnError)
	listen := flags.String("listen", "127.0.0.1:0", "HOST:PORT to serve TLS on")
	material := addTLSFlags(flags)
	flags.Parse(arguments)
	own, pool := material.load()
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{own},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	})
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(err.Error())
	}
	server := grpc.NewServer(grpc.Creds(creds))
	kv.RegisterKVServer(server, &store{values: map[string]string{}})
	adder.RegisterAdderServer(server, adderServer{})
	api.RegisterMetricsServer(server, metricsServer{})
	fmt.Printf("listening on %s\n", listener.Addr())
	os.Stdout.Sync()
	if err := server.Serve(listener); err != nil {
		fail(err.Error())
	}
}

func runHealth(arguments []string) {
	flags := flag.NewFlagSet("health", flag.ExitOnError)
	target := flags.String("target", "", "the sidecar's ingress, HOST:PORT")
	serverName := flags.String("server-name", "", "name the ingress certificate must carry")
	service := flags.String("service", "", "the service asked about")
	watch := flags.Int("watch", 0, "statuses to read from a Watch after the Check")
	material := addTLSFlags(flags)
	flags.Parse(arguments)
	own, pool := material.load()
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{own},
		RootCAs:      pool,
		ServerName:   *serverName,
		MinVersion:   tls.VersionTLS12,
	})
	conn, err := grpc.Dial(*target, grpc.WithTransportCredentials(creds))
	if err != nil {
		fail(err.Error())
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	request := &healthpb.HealthCheckRequest{Service: *service}
	reply, err := health.Check(ctx, request)
	if err != nil {
		s := status.Convert(err)
		fmt.Printf("check error %s %s\n", s.Code(), s.Message())
	} else {
		fmt.Printf("check %s\n", reply.Status)
	}
	if *watch == 0 {
		return
	}
	stream, err := health.Watch(ctx, request)
	if err != nil {
		fail(err.Error())
	}
	for received := 0; received < *watch; received++ {
		reply, err := stream.Recv()
		if err != nil {
			s := status.Convert(err)
			fmt.Printf("watch end %s %s\n", s.Code(), s.Message())
			return
		}
		fmt.Printf("watch %s\n", reply.Status)
	}
}
