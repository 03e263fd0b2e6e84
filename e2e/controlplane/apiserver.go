package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	apiapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apioptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

// apiserverArgs are the kube-apiserver command-line flags, parsed by the
// apiserver's own flag set so that every flag keeps its upstream meaning.
func apiserverArgs(cfg *config, p *pki) []string {
	args := []string{
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", cfg.etcdClientPort),
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", cfg.apiserverPort),
		"--cert-dir=" + filepath.Join(p.Dir, "generated"),
		"--tls-cert-file=" + p.ServingCert,
		"--tls-private-key-file=" + p.ServingKey,
		"--client-ca-file=" + p.ClientCACert,
		"--authorization-mode=Node,RBAC",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		fmt.Sprintf("--service-account-issuer=%s", cfg.serverURL()),
		"--service-account-key-file=" + p.SAPub,
		"--service-account-signing-key-file=" + p.SAKey,
		"--profiling=false",
		fmt.Sprintf("--v=%d", cfg.verbosity),
	}
	if cfg.node == nil {
		return append(args,
			"--advertise-address=127.0.0.1",
			// Loopback addresses are not valid Endpoints; there is no real
			// network behind the "kubernetes" Service anyway.
			"--endpoint-reconciler-type=none",
		)
	}
	return append(args,
		// The "kubernetes" Service's endpoint: the forwarder on the node link.
		"--advertise-address="+cfg.node.hostAddress.String(),
		"--kubelet-client-certificate="+p.APIKubeletCert,
		"--kubelet-client-key="+p.APIKubeletKey,
		"--kubelet-certificate-authority="+p.CACert,
		"--kubelet-preferred-address-types=InternalIP",
		// Webhooks and aggregated APIs behind a Service are called at an endpoint's pod
		// IP, which the host reaches over the node link; Service IPs exist only inside
		// the node (kube-proxy), as on a control plane that runs no kube-proxy.
		"--enable-aggregator-routing=true",
	)
}

// prepareAPIServer parses the flags and returns the completed, validated
// options, ready for app.Run.
func prepareAPIServer(ctx context.Context, cfg *config, p *pki) (apioptions.CompletedOptions, error) {
	s := apioptions.NewServerRunOptions()
	registry := s.GenericServerRunOptions.ComponentGlobalsRegistry
	featureGate := registry.FeatureGateFor(basecompatibility.DefaultKubeComponent)

	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	args := append(apiserverArgs(cfg, p), cfg.extraAPIServerArgs...)
	if err := fs.Parse(args); err != nil {
		return apioptions.CompletedOptions{}, fmt.Errorf("kube-apiserver flags: %w", err)
	}
	// What cobra's PersistentPreRunE does in the real binary.
	if err := registry.Set(); err != nil {
		return apioptions.CompletedOptions{}, err
	}
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return apioptions.CompletedOptions{}, err
	}

	completed, err := s.Complete(ctx)
	if err != nil {
		return apioptions.CompletedOptions{}, err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return apioptions.CompletedOptions{}, utilerrors.NewAggregate(errs)
	}
	featureGate.(featuregate.MutableFeatureGate).AddMetrics()
	registry.AddMetrics()
	return completed, nil
}

func runAPIServer(ctx context.Context, opts apioptions.CompletedOptions) error {
	return apiapp.Run(ctx, opts)
}
