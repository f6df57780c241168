// The grpc-js caller of tests/hostile/test_faults.py: it holds a call in flight through the
// sidecar while the test kills the app, then, once told the app is back (SIGHUP), calls
// until one succeeds, on the same channel throughout. Messages are raw bytes (the probe
// echoes them). One JSON object a line on stdout, as tests/go/faults.go prints:
//   {"event":"ready"}  {"event":"ended","code":N,"message":M}
//   {"event":"recovered","failures":N,"first_failure":S}  {"event":"gave_up","code":N,"message":M}
// Usage: node faults.js ADDRESS CA.pem CLIENT.pem CLIENT.key
"use strict";
const fs = require("fs");
const grpc = require("@grpc/grpc-js");

const [address, caFile, certFile, keyFile] = process.argv.slice(2);
const credentials = grpc.credentials.createSsl(
  fs.readFileSync(caFile), fs.readFileSync(keyFile), fs.readFileSync(certFile));
const client = new grpc.Client(address, credentials);
const raw = (buffer) => buffer;
const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");

function call(metadata, milliseconds) {
  return new Promise((resolve) => {
    client.makeUnaryRequest("/probe.Probe/Unary", raw, raw, Buffer.from("node"), metadata,
      { deadline: new Date(Date.now() + milliseconds) },
      (error) => resolve(error ? { code: error.code, message: error.details } : null));
  });
}

// A signal handler alone does not keep Node running: a timer, which also bounds the wait.
const appBack = new Promise((resolve) => {
  const waiting = setTimeout(() => {
    emit({ event: "gave_up", code: -1, message: "no SIGHUP within 60 s" });
    process.exit(1);
  }, 60000);
  process.on("SIGHUP", () => {
    clearTimeout(waiting);
    resolve();
  });
});

(async () => {
  let error = await call(new grpc.Metadata(), 10000);
  if (error) {
    emit({ event: "failed", ...error });
    process.exit(1);
  }
  emit({ event: "ready" });
  const hold = new grpc.Metadata();
  hold.set("x-probe-gate", "hold");
  emit({ event: "ended", ...((await call(hold, 30000)) || { code: 0, message: "" }) });
  await appBack;
  const giveUp = Date.now() + 10000;
  let firstFailure = "";
  for (let failures = 0; ; failures++) {
    error = await call(new grpc.Metadata(), 200);
    if (!error) {
      emit({ event: "recovered", failures, first_failure: firstFailure });
      break;
    }
    if (!failures) firstFailure = `${grpc.status[error.code]}: ${error.message}`;
    if (Date.now() > giveUp) {
      emit({ event: "gave_up", ...error });
      process.exitCode = 1;
      break;
    }
  }
  client.close();
})();
