// Command benchtool is the benchmark's upstream and load generator (grpc-go).
//
//	benchtool server -listen 127.0.0.1:0
//	    A plaintext bench.Echo server; prints "listening on HOST:PORT".
//
//	benchtool load -target HOST:PORT [-ca CA -cert CERT -key KEY -server-name NAME]
//	    -workload unary|pingpong|newconn -size BYTES -concurrency N -connections K
//	    -duration 5s -warmup 1s
//	    Runs the workload and prints one JSON object: calls, seconds, calls_per_s,
//	    p50_ms, p99_ms, errors and the first error's text. newconn: each call on a
//	    connection of its own (dialled, a full TLS handshake, closed after the call),
//	    -concurrency of them at a time; a call's latency includes its connection's.
//	    -resume: TLS sessions are kept and resumed (after the first handshakes).
//
//	benchtool idle -target HOST:PORT [-ca ...] -connections N
//	    Opens N connections, makes one call on each so every hop is set up, prints
//	    "ready", and holds them until its standard input closes.
//
//	benchtool churn -target HOST:PORT [-ca ...] -connections N -concurrency K -every M
//	    Opens N connections, K at a time, each for one call and closed after it;
//	    prints "done I" after every M, then one JSON object: connections, errors,
//	    the first error's text.
//
//	benchtool handshakes -target HOST:PORT -ca ... [-resume] -duration 5s
//	    TLS connections one after another, each closed once the server has
//	    answered the client's last handshake flight (its session ticket, sent only
//	    after it has verified the client's certificate), no request made. Prints
//	    one JSON object: connections, seconds, connections_per_s, resumed, errors,
//	    the first error's text.
//
// Without -ca the connection is plaintext (the upstream directly).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"sidecar.bench/gen/echo"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: benchtool server|load|idle|churn|handshakes [flags]")
	}
	switch os.Args[1] {
	case "server":
		runServer(os.Args[2:])
	case "load":
		runLoad(os.Args[2:])
	case "idle":
		runIdle(os.Args[2:])
	case "churn":
		runChurn(os.Args[2:])
	case "handshakes":
		runHandshakes(os.Args[2:])
	default:
		fail("unknown command " + os.Args[1])
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "benchtool:", message)
	os.Exit(2)
}

const maxMessage = 64 << 20

type echoServer struct{ echo.UnimplementedEchoServer }

func (echoServer) Unary(_ context.Context, request *echo.Payload) (*echo.Payload, error) {
	return request, nil
}

func (echoServer) PingPong(stream echo.Echo_PingPongServer) error {
	for {
		message, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(message); err != nil {
			return err
		}
	}
}

func runServer(arguments []string) {
	flags := flag.NewFlagSet("server", flag.ExitOnError)
	listen := flags.String("listen", "127.0.0.1:0", "HOST:PORT")
	flags.Parse(arguments)
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(err.Error())
	}
	server := grpc.NewServer(grpc.MaxRecvMsgSize(maxMessage), grpc.MaxSendMsgSize(maxMessage))
	echo.RegisterEchoServer(server, echoServer{})
	fmt.Printf("listening on %s\n", listener.Addr())
	os.Stdout.Sync()
	if err := server.Serve(listener); err != nil {
		fail(err.Error())
	}
}

type dialFlags struct {
	target, ca, cert, key, serverName *string
	resume                            *bool
}

// sessions keeps TLS sessions for -resume: every connection after the first resumes one.
var sessions = tls.NewLRUClientSessionCache(256)

func addDialFlags(flags *flag.FlagSet) dialFlags {
	return dialFlags{
		target:     flags.String("target", "", "HOST:PORT"),
		ca:         flags.String("ca", "", "CA (PEM); without it, plaintext"),
		cert:       flags.String("cert", "", "client certificate (PEM)"),
		key:        flags.String("key", "", "client key (PEM)"),
		serverName: flags.String("server-name", "", "name the server certificate carries"),
		resume:     flags.Bool("resume", false, "keep TLS sessions and resume them (tickets)"),
	}
}

func (f dialFlags) dial() *grpc.ClientConn {
	conn, err := f.tryDial()
	if err != nil {
		fail(err.Error())
	}
	return conn
}

// tryDial connects (TLS with -ca: without -resume, no session cache, so every handshake
// is a full one).
func (f dialFlags) tryDial() (*grpc.ClientConn, error) {
	if *f.target == "" {
		fail("-target is required")
	}
	options := []grpc.DialOption{
		grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
	}
	if *f.ca == "" {
		options = append(options, grpc.WithInsecure())
	} else {
		config := f.tlsConfig()
		if *f.resume {
			config.ClientSessionCache = sessions
		}
		options = append(options, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *f.target, options...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %v", *f.target, err)
	}
	return conn, nil
}

// tlsConfig is the client's TLS: its certificate, the CA, the server's name, TLS 1.2 or later.
func (f dialFlags) tlsConfig() *tls.Config {
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
	return &tls.Config{
		Certificates: []tls.Certificate{own},
		RootCAs:      pool,
		ServerName:   *f.serverName,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"h2"},
	}
}

// recorder collects call latencies after the warm-up, and errors.
type recorder struct {
	mu        sync.Mutex
	latencies []time.Duration
	errors    int
	firstErr  string
}

func (r *recorder) add(latency time.Duration, err error, measuring bool) {
	if !measuring && err == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.errors++
		if r.firstErr == "" {
			r.firstErr = err.Error()
		}
		return
	}
	r.latencies = append(r.latencies, latency)
}

func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	index := int(p * float64(len(sorted)-1))
	return float64(sorted[index]) / float64(time.Millisecond)
}

func runLoad(arguments []string) {
	flags := flag.NewFlagSet("load", flag.ExitOnError)
	target := addDialFlags(flags)
	workload := flags.String("workload", "unary", "unary or pingpong")
	size := flags.Int("size", 64, "payload bytes")
	concurrency := flags.Int("concurrency", 1, "calls (or streams) in flight")
	connections := flags.Int("connections", 1, "connections the calls are spread over")
	duration := flags.Duration("duration", 5*time.Second, "measured time")
	warmup := flags.Duration("warmup", time.Second, "time before measuring")
	flags.Parse(arguments)
	if *connections < 1 || *concurrency < *connections {
		fail("need 1 <= -connections <= -concurrency")
	}
	clients := make([]echo.EchoClient, *connections)
	for i := range clients {
		if *workload != "newconn" {
			clients[i] = echo.NewEchoClient(target.dial())
		}
	}
	payload := &echo.Payload{Data: make([]byte, *size)}
	results := &recorder{}
	start := time.Now()
	measureFrom := start.Add(*warmup)
	measureUntil := measureFrom.Add(*duration)
	var workers sync.WaitGroup
	for i := 0; i < *concurrency; i++ {
		client := clients[i%len(clients)]
		workers.Add(1)
		go func() {
			defer workers.Done()
			switch *workload {
			case "unary":
				unaryWorker(client, payload, measureFrom, measureUntil, results)
			case "pingpong":
				pingPongWorker(client, payload, measureFrom, measureUntil, results)
			case "newconn":
				newConnectionWorker(target, payload, measureFrom, measureUntil, results)
			default:
				fail("unknown workload " + *workload)
			}
		}()
	}
	workers.Wait()
	sorted := results.latencies
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	seconds := duration.Seconds()
	report := map[string]interface{}{
		"calls":       len(sorted),
		"seconds":     seconds,
		"calls_per_s": float64(len(sorted)) / seconds,
		"p50_ms":      percentile(sorted, 0.50),
		"p99_ms":      percentile(sorted, 0.99),
		"errors":      results.errors,
		"first_error": results.firstErr,
	}
	if err := json.NewEncoder(os.Stdout).Encode(report); err != nil {
		fail(err.Error())
	}
}

func unaryWorker(client echo.EchoClient, payload *echo.Payload, from, until time.Time, results *recorder) {
	for {
		began := time.Now()
		if !began.Before(until) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := client.Unary(ctx, payload)
		cancel()
		results.add(time.Since(began), err, !began.Before(from))
	}
}

func newConnectionWorker(target dialFlags, payload *echo.Payload, from, until time.Time, results *recorder) {
	for {
		began := time.Now()
		if !began.Before(until) {
			return
		}
		conn, err := target.tryDial()
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err = echo.NewEchoClient(conn).Unary(ctx, payload)
			cancel()
			conn.Close()
		}
		results.add(time.Since(began), err, !began.Before(from))
	}
}

func pingPongWorker(client echo.EchoClient, payload *echo.Payload, from, until time.Time, results *recorder) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.PingPong(ctx)
	if err != nil {
		results.add(0, err, true)
		return
	}
	for {
		began := time.Now()
		if !began.Before(until) {
			stream.CloseSend()
			return
		}
		err := stream.Send(payload)
		if err == nil {
			_, err = stream.Recv()
		}
		results.add(time.Since(began), err, !began.Before(from))
		if err != nil {
			return
		}
	}
}

func runIdle(arguments []string) {
	flags := flag.NewFlagSet("idle", flag.ExitOnError)
	target := addDialFlags(flags)
	connections := flags.Int("connections", 1000, "connections to hold")
	flags.Parse(arguments)
	held := make([]*grpc.ClientConn, 0, *connections)
	payload := &echo.Payload{Data: []byte("x")}
	for i := 0; i < *connections; i++ {
		conn := target.dial()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := echo.NewEchoClient(conn).Unary(ctx, payload)
		cancel()
		if err != nil {
			fail(fmt.Sprintf("connection %d: %v", i, err))
		}
		held = append(held, conn)
	}
	fmt.Println("ready")
	os.Stdout.Sync()
	io.Copy(ioutil.Discard, bufio.NewReader(os.Stdin))
	for _, conn := range held {
		conn.Close()
	}
}

func runChurn(arguments []string) {
	flags := flag.NewFlagSet("churn", flag.ExitOnError)
	target := addDialFlags(flags)
	connections := flags.Int("connections", 10000, "connections to open, one call each")
	concurrency := flags.Int("concurrency", 8, "connections open at once")
	every := flags.Int("every", 10000, "print progress after this many")
	flags.Parse(arguments)
	payload := &echo.Payload{Data: []byte("x")}
	results := &recorder{}
	var mu sync.Mutex
	started, finished := 0, 0
	var workers sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for {
				mu.Lock()
				if started >= *connections {
					mu.Unlock()
					return
				}
				started++
				mu.Unlock()
				conn := target.dial()
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := echo.NewEchoClient(conn).Unary(ctx, payload)
				cancel()
				conn.Close()
				results.add(0, err, false)
				mu.Lock()
				finished++
				if finished%*every == 0 {
					fmt.Printf("done %d\n", finished)
					os.Stdout.Sync()
				}
				mu.Unlock()
			}
		}()
	}
	workers.Wait()
	report := map[string]interface{}{
		"connections": *connections,
		"errors":      results.errors,
		"first_error": results.firstErr,
	}
	if err := json.NewEncoder(os.Stdout).Encode(report); err != nil {
		fail(err.Error())
	}
}

// ticketWatch is a connection's session cache: it says when the server's session ticket
// arrived (a TLS 1.3 server sends one only once it has verified the client's certificate
// flight), and keeps the session in the shared cache with -resume.
type ticketWatch struct {
	shared  tls.ClientSessionCache // nil: nothing kept, every handshake a full one
	arrived chan struct{}
}

func (w *ticketWatch) Get(key string) (*tls.ClientSessionState, bool) {
	if w.shared == nil {
		return nil, false
	}
	return w.shared.Get(key)
}

func (w *ticketWatch) Put(key string, session *tls.ClientSessionState) {
	if session == nil { // an eviction, not a ticket
		return
	}
	if w.shared != nil {
		w.shared.Put(key, session)
	}
	select {
	case w.arrived <- struct{}{}:
	default:
	}
}

// handshakeOnce connects, completes the handshake, and waits for the server's ticket.
func handshakeOnce(target string, base *tls.Config, shared tls.ClientSessionCache, timeout time.Duration) (bool, error) {
	raw, err := net.DialTimeout("tcp", target, timeout)
	if err != nil {
		return false, err
	}
	defer raw.Close()
	watch := &ticketWatch{shared: shared, arrived: make(chan struct{}, 1)}
	config := base.Clone()
	config.ClientSessionCache = watch
	conn := tls.Client(raw, config)
	raw.SetDeadline(time.Now().Add(timeout))
	if err := conn.Handshake(); err != nil {
		return false, err
	}
	resumed := conn.ConnectionState().DidResume
	// Reading is what processes the ticket; the read ends when the connection is closed.
	go conn.Read(make([]byte, 1))
	select {
	case <-watch.arrived:
		return resumed, nil
	case <-time.After(timeout):
		return resumed, fmt.Errorf("no session ticket within %v", timeout)
	}
}

func runHandshakes(arguments []string) {
	flags := flag.NewFlagSet("handshakes", flag.ExitOnError)
	target := addDialFlags(flags)
	duration := flags.Duration("duration", 5*time.Second, "how long to connect")
	flags.Parse(arguments)
	if *target.target == "" || *target.ca == "" {
		fail("-target and -ca are required")
	}
	base := target.tlsConfig()
	var shared tls.ClientSessionCache
	if *target.resume {
		shared = tls.NewLRUClientSessionCache(16)
	}
	results := &recorder{}
	connections, resumed := 0, 0
	start := time.Now()
	for time.Since(start) < *duration {
		didResume, err := handshakeOnce(*target.target, base, shared, 5*time.Second)
		results.add(0, err, false)
		if err == nil {
			connections++
			if didResume {
				resumed++
			}
		}
	}
	seconds := time.Since(start).Seconds()
	report := map[string]interface{}{
		"connections":       connections,
		"seconds":           seconds,
		"connections_per_s": float64(connections) / seconds,
		"resumed":           resumed,
		"errors":            results.errors,
		"first_error":       results.firstErr,
	}
	if err := json.NewEncoder(os.Stdout).Encode(report); err != nil {
		fail(err.Error())
	}
}
