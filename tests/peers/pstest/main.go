// Command pstest runs Google's in-memory Pub/Sub fake on a random loopback port for dmrepl's tests.
// It prints the address on stdout, then serves until SIGTERM or SIGINT.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/pstest"
)

func main() {
	srv := pstest.NewServer()
	fmt.Println(srv.Addr)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	srv.Close()
}
