package main

import (
	"context"
	"fmt"

	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	"k8s.io/kubernetes/cmd/kube-controller-manager/names"
)

// kcmControllers are the controllers this control plane runs: what the
// operator's tests need and what a Deployment of it on the node needs.
// Everything else (IPAM, taint eviction, jobs, daemon sets, ...) is left out.
var kcmControllers = []string{
	names.DeploymentController,                 // Deployments -> ReplicaSets (helm install of the operator)
	names.ReplicaSetController,                 // ReplicaSets -> Pods
	names.EndpointSliceController,              // Services -> EndpointSlices (kube-proxy)
	names.NodeLifecycleController,              // lifts the node.kubernetes.io/not-ready taint admission puts on a new Node
	names.GarbageCollectorController,           // ownerReferences cascade
	names.NamespaceController,                  // namespace deletion
	names.ServiceAccountController,             // "default" ServiceAccount per namespace
	names.ServiceAccountTokenController,        // legacy token Secrets
	names.RootCACertificatePublisherController, // kube-root-ca.crt ConfigMap per namespace
	names.ClusterRoleAggregationController,     // admin/edit/view aggregated ClusterRoles
}

// runKCM runs kube-controller-manager in this process. Its options are set
// in code: registering a second set of flags against the shared
// feature-gate registry would panic.
func runKCM(ctx context.Context, cfg *config, p *pki, kubeconfig string) error {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return err
	}
	s.Generic.ClientConnection.Kubeconfig = kubeconfig
	s.Generic.Controllers = kcmControllers
	s.Generic.LeaderElection.LeaderElect = false
	s.SAController.ServiceAccountKeyFile = p.SAKey
	s.SAController.RootCAFile = p.CACert
	s.KubeCloudShared.UseServiceAccountCredentials = false

	if cfg.kcmPort > 0 {
		s.SecureServing.BindAddress = loopback
		s.SecureServing.BindPort = cfg.kcmPort
		// Bearer tokens are checked with TokenReview/SubjectAccessReview
		// against the apiserver; client certificates against our client CA.
		// No in-cluster lookup: there is no request-header CA to find.
		s.Authentication.RemoteKubeConfigFile = kubeconfig
		s.Authentication.ClientCert.ClientCA = p.ClientCACert
		s.Authentication.SkipInClusterLookup = true
		s.Authorization.RemoteKubeConfigFile = kubeconfig
	} else {
		s.SecureServing.Required = false
		s.SecureServing.BindPort = 0
	}

	known := kcmapp.KnownControllers()
	disabled := kcmapp.ControllersDisabledByDefault()
	aliases := kcmapp.ControllerAliases()
	c, err := s.Config(ctx, known, disabled, aliases)
	if err != nil {
		return fmt.Errorf("kube-controller-manager config: %w", err)
	}
	return kcmapp.Run(ctx, c.Complete())
}
