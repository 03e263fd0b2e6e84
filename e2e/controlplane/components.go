package main

// The other Kubernetes components, from the same k8s.io/kubernetes module and
// in this same binary (as hyperkube once did): `controlplane kubelet ARGS`,
// `controlplane kube-proxy ARGS` and `controlplane kube-scheduler ARGS` run the
// upstream command exactly as its own main would, with its own flags. Each
// runs in a process of its own: the control plane starts kube-scheduler as
// its child, e2e/scripts/node-up.sh starts the kubelet and kube-proxy inside
// the node's namespaces.

import (
	"context"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // as the upstream mains
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	proxyapp "k8s.io/kubernetes/cmd/kube-proxy/app"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubeletapp "k8s.io/kubernetes/cmd/kubelet/app"
)

var components = map[string]func() *cobra.Command{
	"kubelet":        func() *cobra.Command { return kubeletapp.NewKubeletCommand(context.Background()) },
	"kube-proxy":     proxyapp.NewProxyCommand,
	"kube-scheduler": func() *cobra.Command { return schedapp.NewSchedulerCommand() },
}

// runComponent runs os.Args[1] as that component when it names one; it
// returns false otherwise.
func runComponent() bool {
	if len(os.Args) < 2 {
		return false
	}
	newCmd, ok := components[os.Args[1]]
	if !ok {
		return false
	}
	cmd := newCmd()
	cmd.SetArgs(os.Args[2:])
	os.Exit(cli.Run(cmd))
	return true
}
