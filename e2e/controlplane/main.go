// Command controlplane runs a local Kubernetes control plane for the
// kube-sts end-to-end tests in one process: embedded etcd, the real
// kube-apiserver and kube-controller-manager (used as libraries), all bound
// to 127.0.0.1, and kube-scheduler (a child process of this same binary).
//
//	controlplane --dir STATE [--apiserver-port 16443] [--etcd-client-port 12379]
//	             [--etcd-peer-port 12380] [--kcm-port 0] [--v 0]
//	             [--node-name N --node-address IP --host-address IP]
//	             [-- extra kube-apiserver flags]
//	controlplane kubelet|kube-proxy|kube-scheduler [upstream flags]
//
// STATE keeps etcd's data, the generated keys and certificates (pki/) and
// the admin kubeconfig (kubeconfig); a restart on the same STATE reuses them.
// With --node-name the apiserver is also reachable on the node link
// (--host-address) and advertises that address, and the node's credentials
// and kubeconfigs are written into STATE/pki and STATE/node (see node.go).
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

type config struct {
	dir                string
	apiserverPort      int
	etcdClientPort     int
	etcdPeerPort       int
	kcmPort            int
	verbosity          int
	etcdLogLevel       string
	extraAPIServerArgs []string
	node               *nodeConfig // nil: no node
}

func (c *config) serverURL() string {
	return fmt.Sprintf("https://127.0.0.1:%d", c.apiserverPort)
}

func main() {
	if runComponent() {
		return
	}
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func parseFlags() (*config, error) {
	cfg := &config{}
	fs := pflag.NewFlagSet("controlplane", pflag.ContinueOnError)
	fs.StringVar(&cfg.dir, "dir", "", "state directory (etcd data, pki, kubeconfig); required")
	fs.IntVar(&cfg.apiserverPort, "apiserver-port", 16443, "kube-apiserver secure port on 127.0.0.1")
	fs.IntVar(&cfg.etcdClientPort, "etcd-client-port", 12379, "etcd client port on 127.0.0.1")
	fs.IntVar(&cfg.etcdPeerPort, "etcd-peer-port", 12380, "etcd peer port on 127.0.0.1")
	fs.IntVar(&cfg.kcmPort, "kcm-port", 0, "kube-controller-manager secure port on 127.0.0.1 (0 disables its HTTPS endpoint)")
	fs.IntVarP(&cfg.verbosity, "v", "v", 0, "klog verbosity of kube-apiserver and kube-controller-manager")
	fs.StringVar(&cfg.etcdLogLevel, "etcd-log-level", "warn", "embedded etcd log level (debug, info, warn, error)")
	var nodeName, nodeAddress, hostAddress string
	fs.StringVar(&nodeName, "node-name", "", "name of the node the kubelet registers (enables the node settings below)")
	fs.StringVar(&nodeAddress, "node-address", "", "the node's InternalIP (kubelet serving certificate)")
	fs.StringVar(&hostAddress, "host-address", "", "the host's address on the node link: the apiserver is also reached and advertised there")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "Usage: controlplane --dir DIR [flags] [-- kube-apiserver flags]\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		return nil, err
	}
	if n := fs.ArgsLenAtDash(); n >= 0 {
		if n > 0 {
			return nil, fmt.Errorf("unexpected arguments: %v", fs.Args()[:n])
		}
		cfg.extraAPIServerArgs = fs.Args()
	} else if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if cfg.dir == "" {
		fs.Usage()
		return nil, errors.New("--dir is required")
	}
	if nodeName != "" || nodeAddress != "" || hostAddress != "" {
		n := &nodeConfig{name: nodeName, address: net.ParseIP(nodeAddress), hostAddress: net.ParseIP(hostAddress)}
		if n.name == "" || n.address.To4() == nil || n.hostAddress.To4() == nil {
			return nil, errors.New("--node-name, --node-address and --host-address (IPv4) go together")
		}
		cfg.node = n
	}
	abs, err := filepath.Abs(cfg.dir)
	if err != nil {
		return nil, err
	}
	cfg.dir = abs
	return cfg, nil
}

func run() error {
	cfg, err := parseFlags()
	if err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil
		}
		return err
	}
	if err := os.MkdirAll(cfg.dir, 0o700); err != nil {
		return err
	}

	p := newPKI(cfg.dir)
	if err := p.ensure(cfg.node); err != nil {
		return err
	}
	kubeconfig := filepath.Join(cfg.dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, cfg.serverURL(), p); err != nil {
		return err
	}
	if cfg.node != nil {
		if err := writeNodeKubeconfigs(cfg, p); err != nil {
			return err
		}
	}

	// First SIGTERM/SIGINT: orderly shutdown. Second: exit at once.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		klog.Infof("controlplane: received %v, shutting down", s)
		cancel()
		<-sigs
		fmt.Fprintln(os.Stderr, "controlplane: second signal, exiting")
		os.Exit(1)
	}()

	start := time.Now()
	if cfg.node != nil {
		listen := net.JoinHostPort(cfg.node.hostAddress.String(), fmt.Sprint(cfg.apiserverPort))
		if err := forwardAPIServer(ctx, listen, net.JoinHostPort(loopback.String(), fmt.Sprint(cfg.apiserverPort))); err != nil {
			return err
		}
	}
	etcd, err := startEtcd(cfg.dir, cfg.etcdClientPort, cfg.etcdPeerPort, cfg.etcdLogLevel)
	if err != nil {
		return err
	}
	closeEtcd := sync.OnceFunc(etcd.Close)
	defer closeEtcd()
	klog.Infof("controlplane: etcd ready on 127.0.0.1:%d after %v", cfg.etcdClientPort, time.Since(start).Round(time.Millisecond))

	opts, err := prepareAPIServer(ctx, cfg, p)
	if err != nil {
		return err
	}
	apiErr := make(chan error, 1)
	go func() { apiErr <- runAPIServer(ctx, opts) }()

	if err := waitReady(ctx, kubeconfig, apiErr, etcd.Err()); err != nil {
		if ctx.Err() != nil { // signalled while starting: a normal stop
			select {
			case <-apiErr:
			case <-time.After(30 * time.Second):
			}
			return nil
		}
		cancel()
		return err
	}
	klog.Infof("controlplane: kube-apiserver ready on %s after %v", cfg.serverURL(), time.Since(start).Round(time.Millisecond))

	kcmErr := make(chan error, 1)
	go func() { kcmErr <- runKCM(ctx, cfg, p, kubeconfig) }()
	schedErr := make(chan error, 1)
	go func() {
		schedErr <- runChild(ctx, "kube-scheduler", "--kubeconfig="+kubeconfig, "--leader-elect=false",
			"--secure-port=0", fmt.Sprintf("--v=%d", cfg.verbosity))
	}()

	fmt.Printf("controlplane: ready; kubeconfig %s\n", kubeconfig)

	var runErr error
	select {
	case <-ctx.Done():
	case err := <-apiErr:
		runErr = fmt.Errorf("kube-apiserver stopped: %w", err)
	case err := <-kcmErr:
		runErr = fmt.Errorf("kube-controller-manager stopped: %v", err)
	case err := <-schedErr:
		runErr = fmt.Errorf("kube-scheduler stopped: %v", err)
	case err := <-etcd.Err():
		runErr = fmt.Errorf("etcd failed: %w", err)
	}
	cancel()
	select { // the scheduler gets SIGTERM from runChild
	case <-schedErr:
	case <-time.After(20 * time.Second):
	}

	// Let the apiserver drain before etcd goes away.
	select {
	case err := <-apiErr:
		if err != nil && runErr == nil {
			runErr = fmt.Errorf("kube-apiserver: %w", err)
		}
	case <-time.After(30 * time.Second):
		klog.Warning("controlplane: kube-apiserver did not stop within 30s")
	}
	closeEtcd()
	klog.Info("controlplane: stopped")
	return runErr
}

// waitReady polls /readyz with the admin credentials until it answers ok.
func waitReady(ctx context.Context, kubeconfig string, apiErr <-chan error, etcdErr <-chan error) error {
	restCfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	restCfg.Timeout = 5 * time.Second
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return err
	}
	deadline := time.After(5 * time.Minute)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-apiErr:
			return fmt.Errorf("kube-apiserver stopped before it was ready: %v", err)
		case err := <-etcdErr:
			return fmt.Errorf("etcd failed: %w", err)
		case <-deadline:
			return errors.New("kube-apiserver not ready after 5 minutes")
		case <-tick.C:
			body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
			if err == nil && string(body) == "ok" {
				return nil
			}
		}
	}
}

// loopback is the only address anything here binds to.
var loopback = net.ParseIP("127.0.0.1")
