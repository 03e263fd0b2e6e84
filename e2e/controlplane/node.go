package main

// What the control plane does for a node (--node-name, --node-address,
// --host-address): the node lives in a network namespace of its own joined to
// the host by a veth pair; hostAddress is the host's end of that link and
// address the node's. The apiserver stays bound to 127.0.0.1 and is also
// reached at hostAddress:<port> through a forwarder in this process, which is
// what it advertises (the "kubernetes" Service's endpoint), so the kubelet,
// kube-proxy and pods reach it as they do in a cluster.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/klog/v2"
)

type nodeConfig struct {
	name        string
	address     net.IP // the node's InternalIP (kubelet serving address)
	hostAddress net.IP // the host's end of the node link
}

// nodeKubeconfigs are written on every start into <dir>/node/.
func (c *config) nodeDir() string { return filepath.Join(c.dir, "node") }

func (c *config) nodeServerURL() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(c.node.hostAddress.String(), fmt.Sprint(c.apiserverPort)))
}

// writeNodeKubeconfigs writes the kubelet's and kube-proxy's kubeconfigs,
// pointing at the apiserver's address on the node link.
func writeNodeKubeconfigs(cfg *config, p *pki) error {
	dir := cfg.nodeDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, k := range []struct{ file, user, cert, key string }{
		{"kubelet.kubeconfig", "system:node:" + cfg.node.name, p.KubeletClientCert, p.KubeletClientKey},
		{"kube-proxy.kubeconfig", "system:kube-proxy", p.ProxyClientCert, p.ProxyClientKey},
	} {
		if err := writeClientKubeconfig(filepath.Join(dir, k.file), cfg.nodeServerURL(), p.CACert, k.user, k.cert, k.key); err != nil {
			return err
		}
	}
	return nil
}

func writeClientKubeconfig(path, server, caPath, user, certPath, keyPath string) error {
	caData, err := os.ReadFile(caPath)
	if err != nil {
		return err
	}
	certData, err := os.ReadFile(certPath)
	if err != nil {
		return err
	}
	keyData, err := os.ReadFile(keyPath)
	if err != nil {
		return err
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters[contextName] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caData}
	kc.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: certData, ClientKeyData: keyData}
	kc.Contexts[contextName] = &clientcmdapi.Context{Cluster: contextName, AuthInfo: user}
	kc.CurrentContext = contextName
	data, err := clientcmd.Write(*kc)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// forwardAPIServer accepts connections on the node link and pipes them to
// the apiserver on 127.0.0.1. It stops when ctx is done.
func forwardAPIServer(ctx context.Context, listen, target string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listening on the node link %s (is the node network up?): %w", listen, err)
	}
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
					klog.Errorf("controlplane: node-link forwarder: %v", err)
				}
				return
			}
			go pipe(conn, target)
		}
	}()
	return nil
}

func pipe(in net.Conn, target string) {
	defer in.Close()
	out, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		klog.V(2).Infof("controlplane: node-link forwarder: %v", err)
		return
	}
	defer out.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	half := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if c, ok := dst.(*net.TCPConn); ok {
			_ = c.CloseWrite()
		}
	}
	go half(out, in)
	go half(in, out)
	wg.Wait()
}

// runChild runs this binary again with args (a component such as
// kube-scheduler, see components.go) until ctx is done, then sends SIGTERM
// and waits. The child gets SIGKILL if this process dies first.
func runChild(ctx context.Context, args ...string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	started := make(chan error, 1)
	var cmd *exec.Cmd
	go func() {
		// Pdeathsig follows the thread that forked: keep this one alive for
		// the child's whole life.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		cmd = exec.Command(self, args...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		done <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return err
	}
	select {
	case err := <-done:
		return fmt.Errorf("%s exited: %v", args[0], err)
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		return nil
	}
}
