#!/usr/bin/env bash
# make demo: builds what it needs (the operator's image, a workload's image, helm), starts
# the local control plane, node and STS peer, installs the operator with `helm install` as
# users do, applies a sample binding, and shows the Secret being issued, used by a pod
# (the admission webhook wires it in) and refreshed with no restart of that pod.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
export KUBECONFIG="$repo/.e2e/kubeconfig"
ns=kube-sts-demo
release=kube-sts

step "Building the operator's image and a workload's image (make image; no container engine)"
read -r image image_tar < <(bash "$here/build-image.sh" | tail -n 1)
read -r app_image app_tar < <(bash "$here/build-image.sh" consumer | tail -n 1)
helm=$(bash "$here/build-helm.sh" | tail -n 1)
step "Starting the local control plane, node and STS peer (the first run builds them: minutes)"
bash "$here/up.sh"
bash "$here/node-import.sh" "$image_tar" "$app_tar"
python="$(bash "$here/sts-venv.sh" | tail -n 1)/bin/python"
set -a; . .e2e/aws.env; set +a
# shellcheck source=node-env.sh
. "$here/node-env.sh"
# Pods reach the STS peer on the host's end of the node link (the peer stands in for AWS).
sts_port=${AWS_ENDPOINT_URL_STS%/}; sts_port=${sts_port##*:}
sts_for_pods="http://$HOST_ADDR:$sts_port"

step "Installing the CRDs"
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/awsrolebindings.kube-sts.io crd/awsrolegrants.kube-sts.io

# The chart's defaults, plus the operator's AWS identity and the one namespace to watch (so
# that `make test` on this environment later is not reconciled by the demo's operator). The
# identity's digest in a pod annotation rolls the pod when the STS peer (restarted with the
# environment) issued new keys.
step "helm install of charts/kube-sts: the chart's defaults plus the operator's AWS identity, watching $ns"
# A fresh start each run: the STS peer forgets its sessions when the environment restarts,
# while the Secrets in etcd would still look valid.
kubectl delete namespace "$ns" --ignore-not-found --wait --timeout=120s >/dev/null
for n in "$release" "$ns"; do kubectl create namespace "$n" --dry-run=client -o yaml | kubectl apply -f - >/dev/null; done
kubectl -n "$release" create secret generic operator-aws \
  --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
"$helm" upgrade --install "$release" charts/kube-sts --namespace "$release" --wait --timeout 5m \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
  --set-string podAnnotations.kube-sts-demo/identity="$(printf %s "$AWS_ACCESS_KEY_ID" | sha256sum | cut -c1-16)" \
  --set aws.existingSecret=operator-aws --set aws.region="$AWS_REGION" --set stsEndpoint="$sts_for_pods" --set watchNamespace="$ns"
kubectl -n "$release" get pods -o wide

step "Creating an IAM role in the STS peer that trusts the operator ($KUBE_STS_OPERATOR_ARN)"
role=$(env $(cat .e2e/aws-admin.env | xargs) "$python" e2e/sts/iam.py create-role --name reports-reader --principal "$KUBE_STS_OPERATOR_ARN")
echo "$role"

step "Namespace, ServiceAccount, grant and binding (900 s session, refreshed 450 s before expiry)"
kubectl -n "$ns" create serviceaccount reports --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply --server-side -f - <<YAML
apiVersion: kube-sts.io/v1alpha1
kind: AWSRoleGrant
metadata: {name: kube-sts-demo}
spec:
  namespaces: [$ns]
  roleArns: ["arn:aws:iam::${AWS_ACCOUNT_ID}:role/reports-*"]
---
apiVersion: kube-sts.io/v1alpha1
kind: AWSRoleBinding
metadata: {name: reports, namespace: $ns}
spec:
  roleArn: $role
  subjects: [{kind: ServiceAccount, name: reports}]
  region: $AWS_REGION
  durationSeconds: 900
  refreshBeforeSeconds: 450
YAML
kubectl -n "$ns" wait --for=condition=Ready --timeout=120s arb/reports
kubectl -n "$ns" get arb reports
step "The Secret (values of the secret keys are not shown)"
kubectl -n "$ns" get secret reports-reports -o go-template='{{range $k, $v := .metadata.annotations}}{{$k}}: {{$v}}{{"\n"}}{{end}}keys:{{range $k, $v := .data}} {{$k}}{{end}}{{"\n"}}'

step "A pod of ServiceAccount reports that says nothing of AWS; the webhook wires the Secret in"
pod_yaml() {
  cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: reports-app}
spec:
  serviceAccountName: reports
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: $app_image
      imagePullPolicy: Never
      # The AWS SDK calling GetCallerIdentity every 10 s; only the STS endpoint is set here
      # (the peer standing in for AWS).
      env:
        - {name: AWS_ENDPOINT_URL_STS, value: "$sts_for_pods"}
        - {name: AWS_EC2_METADATA_DISABLED, value: "true"}
        - {name: CONSUMER_INTERVAL_MS, value: "10000"}
YAML
}
# The webhook fails open (a pod created while it cannot answer is stored unchanged): ask with
# server-side dry runs until it wires the pod, then create it.
wired() { pod_yaml | kubectl -n "$ns" create --dry-run=server -o jsonpath='{.spec.volumes[*].secret.secretName}' -f - 2>/dev/null | grep -qw reports-reports; }
for _ in $(seq 1 60); do wired && break; sleep 2; done
wired || { echo "demo: the webhook does not wire pods; see kubectl -n $release get pods,events" >&2; exit 1; }
pod_yaml | kubectl -n "$ns" apply -f - >/dev/null
kubectl -n "$ns" get pod reports-app -o go-template='{{range .spec.containers}}{{range .env}}  env {{.name}}={{.value}}{{"\n"}}{{end}}{{range .volumeMounts}}  mount {{.mountPath}} ({{.name}}){{"\n"}}{{end}}{{end}}'
kubectl -n "$ns" wait --for=condition=Ready --timeout=120s pod/reports-app
logged_key() { kubectl -n "$ns" logs reports-app --tail=1 | sed -n 's/.*"key":"\([^"]*\)".*/\1/p'; }
for _ in $(seq 1 30); do [ -n "$(logged_key)" ] && break; sleep 1; done
[ -n "$(logged_key)" ] || { kubectl -n "$ns" logs reports-app --tail=2 >&2; echo "demo: the pod's SDK got no credentials (its log above)" >&2; exit 1; }
step "The pod's AWS SDK, through credential_process (its log)"
kubectl -n "$ns" logs reports-app --tail=2

key() { kubectl -n "$ns" get secret reports-reports -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d; }
# What the pod's volume holds now (the kubelet writes it; the container only reads).
mounted_key() { kubectl -n "$ns" exec reports-app -- cat /var/run/secrets/kube-sts.io/credentials.json 2>/dev/null | sed -n 's/.*"AccessKeyId": *"\([^"]*\)".*/\1/p'; }
first=$(key)
first_expiry=$(kubectl -n "$ns" get secret reports-reports -o jsonpath='{.data.AWS_CREDENTIAL_EXPIRATION}' | base64 -d)
step "Waiting for the refresh planned at $(kubectl -n "$ns" get arb reports -o jsonpath='{.status.nextRefreshTime}') (about 7 minutes)"
kubectl -n "$ns" get secret reports-reports --watch-only -o custom-columns='SECRET:.metadata.name,EXPIRES:.metadata.annotations.kube-sts\.io/expiration' &
watcher=$!
trap 'kill $watcher 2>/dev/null || true' EXIT
new=$first
for _ in $(seq 1 600); do
  new=$(key)
  [ "$new" != "$first" ] && break
  sleep 1
done
kill "$watcher" 2>/dev/null || true
[ "$new" != "$first" ] || { echo "demo: no refresh happened; see kubectl -n $release logs deploy/$release" >&2; exit 1; }
step "Refreshed: new access key $new (was $first); waiting for the kubelet to swap it into the running pod's volume"
for _ in $(seq 1 120); do [ "$(mounted_key)" = "$new" ] && break; sleep 1; done
[ "$(mounted_key)" = "$new" ] || { echo "demo: the pod's volume still holds the old key; see kubectl -n $ns describe pod reports-app" >&2; exit 1; }
echo "the pod's volume holds $new (pod restarts: $(kubectl -n "$ns" get pod reports-app -o jsonpath='{.status.containerStatuses[0].restartCount}'))"
kubectl -n "$ns" get arb reports
kubectl -n "$ns" get events --field-selector involvedObject.kind=AWSRoleBinding
echo
echo "The pod's SDK reads credential_process again shortly before the key it holds ($first) expires"
echo "at $first_expiry, and then signs with the key the volume holds then ($new, or a later one: with"
echo "this binding a refresh comes every 7.5 minutes), with no restart: kubectl -n $ns logs -f reports-app"
step "Done. Everything keeps running: KUBECONFIG=.e2e/kubeconfig kubectl get arb -A; make down stops it."
