#!/usr/bin/env bash
# make demo: builds what it needs, starts the local control plane and STS peer, installs
# the CRDs, runs the operator, applies a sample binding, and shows the Secret being issued,
# used through credential_process, and refreshed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
export KUBECONFIG="$repo/.e2e/kubeconfig"
ns=kube-sts-demo

step "Building kube-sts"
cargo build --locked --quiet
step "Starting the local control plane and STS peer (first run builds kube-apiserver: minutes)"
bash "$here/up.sh"
python="$(bash "$here/sts-venv.sh" | tail -n 1)/bin/python"
set -a; . .e2e/aws.env; set +a

step "Installing the CRDs"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/awsrolebindings.kube-sts.io crd/awsrolegrants.kube-sts.io

step "Creating an IAM role in the STS peer that trusts the operator ($KUBE_STS_OPERATOR_ARN)"
role=$(env $(cat .e2e/aws-admin.env | xargs) "$python" e2e/sts/iam.py create-role --name reports-reader --principal "$KUBE_STS_OPERATOR_ARN")
echo "$role"

step "Namespace, ServiceAccount, grant and binding (900 s session, refreshed 450 s before expiry)"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$ns" create serviceaccount reports --dry-run=client -o yaml | kubectl apply -f - >/dev/null
mount="$repo/.e2e/demo-mount"
rm -rf "$mount"; mkdir -p "$mount"
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
  durationSeconds: 900
  refreshBeforeSeconds: 450
  secret: {mountPath: $mount}
YAML

step "Running the operator (log: .e2e/logs/demo-operator.log)"
pkill -f "kube-sts run --namespace $ns --cluster-name demo" 2>/dev/null || true
env -i PATH="$PATH" KUBECONFIG="$KUBECONFIG" AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
  AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" AWS_REGION="$AWS_REGION" \
  AWS_ENDPOINT_URL_STS="$AWS_ENDPOINT_URL_STS" AWS_EC2_METADATA_DISABLED=true \
  target/debug/kube-sts run --namespace "$ns" --cluster-name demo --metrics-addr 127.0.0.1:18080 \
  >.e2e/logs/demo-operator.log 2>&1 &
operator=$!
trap 'kill $operator 2>/dev/null || true' EXIT

kubectl -n "$ns" wait --for=condition=Ready --timeout=60s arb/reports
kubectl -n "$ns" get arb reports
step "The Secret (values of the secret keys are not shown)"
kubectl -n "$ns" get secret reports-reports -o go-template='{{range $k, $v := .metadata.annotations}}{{$k}}: {{$v}}{{"\n"}}{{end}}keys:{{range $k, $v := .data}} {{$k}}{{end}}{{"\n"}}'

show_identity() {
  # What the kubelet does for a mounted Secret: one file per key.
  for key in config credentials.json; do
    kubectl -n "$ns" get secret reports-reports -o "jsonpath={.data.${key//./\\.}}" | base64 -d >"$mount/$key"
  done
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY AWS_CONFIG_FILE="$mount/config" AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    "$python" -c "import boto3; print('GetCallerIdentity via credential_process:', boto3.client('sts').get_caller_identity()['Arn'])"
}
step "A workload's SDK (boto3) using the Secret through credential_process"
show_identity

key() { kubectl -n "$ns" get secret reports-reports -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d; }
first=$(key)
step "Waiting for the refresh planned at $(kubectl -n "$ns" get arb reports -o jsonpath='{.status.nextRefreshTime}') (about 7 minutes)"
kubectl -n "$ns" get secret reports-reports --watch-only -o custom-columns='SECRET:.metadata.name,EXPIRES:.metadata.annotations.kube-sts\.io/expiration' &
watcher=$!
for _ in $(seq 1 720); do
  [ "$(key)" != "$first" ] && break
  sleep 1
done
kill "$watcher" 2>/dev/null || true
[ "$(key)" != "$first" ] || { echo "demo: no refresh happened; see .e2e/logs/demo-operator.log" >&2; exit 1; }
step "Refreshed: new access key $(key) (was $first)"
kubectl -n "$ns" get arb reports
show_identity
kubectl -n "$ns" get events --field-selector involvedObject.kind=AWSRoleBinding
step "Done. The control plane and STS peer keep running: KUBECONFIG=.e2e/kubeconfig kubectl get arb -A; make down stops them."
