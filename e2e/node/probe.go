// A small workload for proving the test node: one static binary that serves HTTP, fetches a URL, resolves a name
// and submits mail, so a pod's logs, exec, Service routing, cluster DNS and an application's submission can each be
// checked without a registry.
//
//	probe serve ADDR      answer every request with "probe <hostname>" and log one line per request
//	probe get URL         print the body of URL (exit 1 on any error or non-200 status)
//	probe resolve NAME    print the addresses NAME resolves to (exit 1 when it does not resolve)
//	probe submit ADDR     submit the message on stdin to ADDR (host:port) as an application does: EHLO, STARTTLS
//	                      verifying the server against $CA_FILE for the name $SERVER_NAME, presenting the client
//	                      certificate $CERT_FILE/$KEY_FILE when set, MAIL FROM $FROM, RCPT TO $TO, DATA; prints
//	                      "sent" (exit 1 naming the step that failed and the server's reply)
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/smtp"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: probe serve ADDR | get URL | resolve NAME | submit ADDR")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2])
	case "get":
		err = get(os.Args[2])
	case "resolve":
		err = resolve(os.Args[2])
	case "submit":
		err = submit(os.Args[2])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

func serve(addr string) error {
	host, err := os.Hostname()
	if err != nil {
		return err
	}
	log.Printf("probe %s serving on %s", host, addr)
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		log.Printf("request %s %s from %s", r.Method, r.URL.Path, r.RemoteAddr)
		fmt.Fprintf(w, "probe %s\n", host)
	})
	return http.ListenAndServe(addr, nil)
}

func get(url string) error {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	_, err = io.Copy(os.Stdout, resp.Body)
	return err
}

func resolve(name string) error {
	addrs, err := net.LookupHost(name)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
	return nil
}

func submit(addr string) error {
	message, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	ca, err := os.ReadFile(os.Getenv("CA_FILE"))
	if err != nil {
		return err
	}
	if !roots.AppendCertsFromPEM(ca) {
		return fmt.Errorf("%s holds no certificate", os.Getenv("CA_FILE"))
	}
	config := &tls.Config{RootCAs: roots, ServerName: os.Getenv("SERVER_NAME"), MinVersion: tls.VersionTLS12}
	if certFile := os.Getenv("CERT_FILE"); certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, os.Getenv("KEY_FILE"))
		if err != nil {
			return err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	if err := conn.SetDeadline(time.Now().Add(60 * time.Second)); err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	client, err := smtp.NewClient(conn, host)
	if err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	defer client.Close()
	if err := client.Hello("app.test"); err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	if err := client.StartTLS(config); err != nil {
		return fmt.Errorf("STARTTLS: %w", err)
	}
	if err := client.Mail(os.Getenv("FROM")); err != nil {
		return fmt.Errorf("MAIL: %w", err)
	}
	if err := client.Rcpt(os.Getenv("TO")); err != nil {
		return fmt.Errorf("RCPT: %w", err)
	}
	data, err := client.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := data.Write(message); err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if err := data.Close(); err != nil {
		return fmt.Errorf("end of DATA: %w", err)
	}
	fmt.Println("sent")
	return client.Quit()
}
