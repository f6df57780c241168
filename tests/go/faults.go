// Command faults is the grpc-go caller of tests/hostile/test_faults.py: it holds a call in
// flight through the sidecar while the test kills the app, then, once told the app is back,
// calls until one succeeds, on the same channel throughout.
//
//	faults -target HOST:PORT -ca CA -cert CERT -key KEY [-server-name NAME]
//
// It speaks to the probe upstream (/probe.Probe/Unary, which echoes its request) with raw
// bytes, as the sidecar does. It prints one JSON object a line:
//
//	{"event":"ready"}                          a first call succeeded
//	{"event":"ended","code":N,"message":M}     the held call (x-probe-gate: hold) ended
//	{"event":"recovered","failures":N,"first_failure":S}
//	                                           after SIGHUP (the app is back), the first call
//	                                           that succeeded (200 ms deadlines each), how
//	                                           many failed before it and how the first did
//	{"event":"gave_up","code":N,"message":M}   none did within 10 s
//
// It is built by tests/hostile/test_faults.py with grpc-go from Debian's packages.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// rawCodec sends and receives message bytes as they are (the probe echoes them).
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string { return "proto" } // content-type application/grpc

func fail(message string) {
	fmt.Fprintln(os.Stderr, "faults:", message)
	os.Exit(2)
}

func emit(event map[string]interface{}) {
	if err := json.NewEncoder(os.Stdout).Encode(event); err != nil {
		fail(err.Error())
	}
}

func outcome(name string, err error) map[string]interface{} {
	s := status.Convert(err)
	return map[string]interface{}{"event": name, "code": uint32(s.Code()), "message": s.Message()}
}

func main() {
	target := flag.String("target", "", "the sidecar's ingress, HOST:PORT")
	serverName := flag.String("server-name", "localhost", "name the ingress certificate carries")
	caFile := flag.String("ca", "", "CA certificate (PEM)")
	certFile := flag.String("cert", "", "client certificate (PEM)")
	keyFile := flag.String("key", "", "client key (PEM)")
	flag.Parse()
	own, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fail(err.Error())
	}
	caPEM, err := ioutil.ReadFile(*caFile)
	if err != nil {
		fail(err.Error())
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		fail("no certificate in " + *caFile)
	}
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
	call := func(ctx context.Context) error {
		request, reply := []byte("go"), []byte(nil)
		return conn.Invoke(ctx, "/probe.Probe/Unary", &request, &reply, grpc.ForceCodec(rawCodec{}))
	}
	appBack := make(chan os.Signal, 1)
	signal.Notify(appBack, syscall.SIGHUP)

	first, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := call(first); err != nil {
		emit(outcome("failed", err))
		os.Exit(1)
	}
	emit(map[string]interface{}{"event": "ready"})

	held, cancelHeld := context.WithTimeout(
		metadata.AppendToOutgoingContext(context.Background(), "x-probe-gate", "hold"),
		30*time.Second)
	defer cancelHeld()
	emit(outcome("ended", call(held)))

	<-appBack
	failures, firstFailure, giveUp := 0, "", time.Now().Add(10*time.Second)
	for {
		attempt, cancelAttempt := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := call(attempt)
		cancelAttempt()
		if err == nil {
			emit(map[string]interface{}{
				"event": "recovered", "failures": failures, "first_failure": firstFailure})
			return
		}
		if failures == 0 {
			s := status.Convert(err)
			firstFailure = s.Code().String() + ": " + s.Message()
		}
		failures++
		if time.Now().After(giveUp) {
			emit(outcome("gave_up", err))
			os.Exit(1)
		}
	}
}
