#!/usr/bin/env bash
# Checks the Helm chart charts/kube-sts: the CRD copy, `helm lint`, `helm template`
# with several value sets, rejection of misspelt and ill-typed values by
# values.schema.json, and — when the local control plane (.e2e/kubeconfig)
# answers — a server-side dry-run apply of every rendering, and a real install, upgrade
# and uninstall of a release with grants (which must be kept) and the admission webhook
# (its configuration selects no namespace here, so other users of the cluster never see
# it).
#
# Prints one line per check ("ok" / "FAIL" / "skip") and exits non-zero when any
# check failed.
#
#   KUBE_STS_CHART_CHECK_NS   namespace for the dry-run (default kube-sts-chart-check-<time>;
#                             it and <ns>-watched are created and deleted again)
set -uo pipefail
set -f # no pathname expansion: value sets hold globs such as role/team-a-*

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
cd "$REPO"

CHART=charts/kube-sts
KUBE_VERSION=1.34.0 # helm built without release ldflags assumes an old minor
KUBECONFIG_E2E=.e2e/kubeconfig
NS="${KUBE_STS_CHART_CHECK_NS:-kube-sts-chart-check-$(date +%s)}"
WATCHED="$NS-watched"
RELEASE=kube-sts

failures=0
ok() { echo "ok    $*"; }
fail() {
	echo "FAIL  $*"
	failures=$((failures + 1))
}
skip() { echo "skip  $*"; }
indent() { sed 's/^/      /'; }

TMP=$(mktemp -d)
cleanup() {
	rm -rf "$TMP"
	if [[ -n "${created_ns:-}" ]]; then
		kubectl --kubeconfig "$KUBECONFIG_E2E" delete namespace "$NS" "$WATCHED" \
			--ignore-not-found --wait=false >/dev/null 2>&1 || true
		# Cluster-scoped leftovers of the release installed in $NS (named after it).
		kubectl --kubeconfig "$KUBECONFIG_E2E" delete awsrolegrant,clusterrole,clusterrolebinding,mutatingwebhookconfiguration,validatingadmissionpolicy,validatingadmissionpolicybinding \
			-l "app.kubernetes.io/instance=$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
	fi
}
trap cleanup EXIT

if ! HELM=$(bash e2e/scripts/build-helm.sh | tail -n 1) || [[ ! -x "$HELM" ]]; then
	fail "build helm (e2e/scripts/build-helm.sh)"
	exit 1
fi
ok "helm: $("$HELM" version --short 2>/dev/null || echo "$HELM")"

# --- the CRD copy --------------------------------------------------------------
if cmp -s crds/kube-sts.yaml "$CHART/crds/kube-sts.yaml"; then
	ok "$CHART/crds/kube-sts.yaml is an exact copy of crds/kube-sts.yaml"
else
	fail "$CHART/crds/kube-sts.yaml differs from crds/kube-sts.yaml (cp crds/kube-sts.yaml $CHART/crds/)"
	diff -u crds/kube-sts.yaml "$CHART/crds/kube-sts.yaml" 2>&1 | head -n 20 | indent
fi

# --- value sets ----------------------------------------------------------------
# name|helm --set arguments (space separated)|patterns (';' separated): each a grep -E
# regex the rendering must contain; `Kind@regex`: within the objects of that kind only;
# a leading `!`: must NOT contain.
SETS=(
	"defaults||image: \"kube-sts:[^\"]+\";kind: ClusterRole$;kind: ClusterRoleBinding;kind: Deployment;kind: Service$;--require-grants=true;path: /readyz;!serviceaccounts/token;!kind: NetworkPolicy;kind: MutatingWebhookConfiguration;MutatingWebhookConfiguration@failurePolicy: Ignore;MutatingWebhookConfiguration@sideEffects: None;MutatingWebhookConfiguration@timeoutSeconds: 5;MutatingWebhookConfiguration@reinvocationPolicy: IfNeeded;MutatingWebhookConfiguration@values: \[\"[^\"]+\", \"kube-system\"\];MutatingWebhookConfiguration@key: kube-sts.io/inject;MutatingWebhookConfiguration@path: /mutate;!MutatingWebhookConfiguration@caBundle:;- webhook$;--manage-certificate=true;--webhook-configuration=kube-sts\";--cert-name=kube-sts-webhook,kube-sts-webhook\.[^,]+,kube-sts-webhook\.[^.]+\.svc\";ClusterRole@resourceNames: \[\"kube-sts\"\];Role@resourceNames: \[\"kube-sts-webhook-tls\"\];Role@verbs: \[\"get\",\"list\",\"watch\",\"update\"\];Secret@name: kube-sts-webhook-tls;PodDisruptionBudget@kube-sts-webhook;Deployment@maxUnavailable: 0;ValidatingAdmissionPolicy@resourceNames: \[\"kube-sts\"\];ValidatingAdmissionPolicy@system:serviceaccount:[^:]+:kube-sts-webhook\";ValidatingAdmissionPolicyBinding@validationActions: \[Deny\]"
	"watchNamespace|--set watchNamespace=team-a|kind: Role$;kind: RoleBinding;--namespace=team-a;resourceNames: \[\"team-a\"\];!serviceaccounts/token"
	"serviceAccountTokens|--set rbac.serviceAccountTokens=true|ClusterRole@resources: \[serviceaccounts/token\]"
	"serviceAccountTokens.watchNamespace|--set rbac.serviceAccountTokens=true --set watchNamespace=team-a|Role@resources: \[serviceaccounts/token\];!ClusterRole@serviceaccounts/token"
	"leaderElection|--set leaderElection.enabled=true --set replicas=2 --set podDisruptionBudget.enabled=true|kind: PodDisruptionBudget;resources: \[leases\];--leader-election=true;--lease-name=kube-sts;replicas: 2;--shards=1\";!kube-sts-shards"
	"sharding|--set sharding.shards=8 --set replicas=3 --set podDisruptionBudget.enabled=true|--shards=8\";--leader-election=false;--lease-name=kube-sts\";--lease-namespace=;replicas: 3;!type: Recreate;kind: PodDisruptionBudget;Role@name: kube-sts-shards;Role@verbs: \[list, create, update, delete\];Role@\"kube-sts-shard-0\";Role@\"kube-sts-shard-7\";!Role@\"kube-sts-shard-8\";RoleBinding@name: kube-sts-shards;!kube-sts-leader-election"
	"sharding.off|--set sharding.shards=1|--shards=1\";type: Recreate;!kube-sts-shards;!--lease-name"
	"serviceMonitor|--set metrics.serviceMonitor.enabled=true|kind: ServiceMonitor"
	"grants|--set grants[0].name=team-a --set grants[0].spec.namespaces[0]=team-a --set grants[0].spec.roleArns[0]=arn:aws:iam::123456789012:role/team-a-* --set grants[0].annotations.owner=team-a|kind: AWSRoleGrant;name: team-a;AWSRoleGrant@helm.sh/resource-policy: keep;AWSRoleGrant@owner: team-a"
	"aws.existingSecret|--set aws.existingSecret=x|envFrom:;name: x$"
	"networkPolicy|--set networkPolicy.enabled=true --set metrics.port=9090 --set-json networkPolicy.metricsFrom=[{\"namespaceSelector\":{\"matchLabels\":{\"team\":\"monitoring\"}},\"podSelector\":{\"matchLabels\":{\"app\":\"prometheus\"}}}]|NetworkPolicy@port: 9090;NetworkPolicy@- Ingress;NetworkPolicy@team: monitoring;NetworkPolicy@app: prometheus;NetworkPolicy@app.kubernetes.io/name: kube-sts;NetworkPolicy@app.kubernetes.io/name: kube-sts-webhook;NetworkPolicy@port: 9443;!NetworkPolicy@Egress"
	"networkPolicy.noPeers|--set networkPolicy.enabled=true|NetworkPolicy@ingress: \[\];!NetworkPolicy@from:;!NetworkPolicy@Egress"
	"webhook.disabled|--set webhook.enabled=false|!kind: MutatingWebhookConfiguration;!kube-sts-webhook;!- webhook$"
	"webhook.watchNamespace|--set watchNamespace=team-a|MutatingWebhookConfiguration@operator: In;MutatingWebhookConfiguration@values: \[\"team-a\"\];ClusterRole@resourceNames: \[\"team-a\"\];Role@resources: \[awsrolebindings\]"
	"webhook.options|--set webhook.failurePolicy=Fail --set webhook.timeoutSeconds=3 --set webhook.replicas=1 --set-json webhook.namespaceSelector={\"matchLabels\":{\"team\":\"a\"}}|MutatingWebhookConfiguration@failurePolicy: Fail;MutatingWebhookConfiguration@timeoutSeconds: 3;MutatingWebhookConfiguration@team: a;!kind: PodDisruptionBudget"
	"webhook.certManager|--set webhook.certManager.enabled=true|kind: Certificate;kind: Issuer;isCA: true;selfSigned: \{\};secretName: kube-sts-webhook-tls;MutatingWebhookConfiguration@cert-manager.io/inject-ca-from: .+/kube-sts-webhook$;--manage-certificate=false;!--webhook-configuration;!--cert-name;!resources: \[mutatingwebhookconfigurations\];!Secret@name: kube-sts-webhook-tls;Role@verbs: \[\"list\",\"watch\"\]$;!kind: ValidatingAdmissionPolicy"
	"webhook.certManager.issuerRef|--set webhook.certManager.enabled=true --set webhook.certManager.issuerRef.name=corp-ca --set webhook.certManager.issuerRef.kind=ClusterIssuer|Certificate@name: corp-ca;Certificate@kind: ClusterIssuer;!isCA: true;!kind: Issuer"
	"webhook.networkPolicy|--set networkPolicy.enabled=true --set-json webhook.networkPolicy.from=[{\"ipBlock\":{\"cidr\":\"10.0.0.0/28\"}}]|NetworkPolicy@port: 9443;NetworkPolicy@cidr: 10.0.0.0/28;NetworkPolicy@ingress: \[\]"
	"webhook.configurationPolicy.off|--set webhook.configurationPolicy=false|!kind: ValidatingAdmissionPolicy;kind: MutatingWebhookConfiguration"
	"networkPolicy.egress|--set networkPolicy.enabled=true --set-json networkPolicy.egress=[{\"ports\":[{\"port\":443}]}]|NetworkPolicy@- Egress;NetworkPolicy@port: 443"
)

# kind_docs FILE KIND: the YAML documents of FILE whose kind is KIND.
kind_docs() {
	awk -v kind="$2" '
		/^---/ { if (doc ~ ("\nkind: " kind "\n")) printf "%s", doc; doc = "" }
		{ doc = doc $0 "\n" }
		END { if (doc ~ ("\nkind: " kind "\n")) printf "%s", doc }
	' "$1"
}

# check_pattern FILE PATTERN: whether FILE satisfies one pattern of SETS.
check_pattern() {
	local file=$1 p=$2 negate=0
	if [[ $p == '!'* ]]; then
		negate=1
		p=${p#!}
	fi
	local found=0
	if [[ $p =~ ^([A-Za-z]+)@(.*)$ ]]; then
		# grep without -q reads to the end: an early exit would fail the pipeline (pipefail)
		# through the SIGPIPE of kind_docs.
		kind_docs "$file" "${BASH_REMATCH[1]}" | grep -E -- "${BASH_REMATCH[2]}" >/dev/null && found=1
	else
		grep -Eq -- "$p" "$file" && found=1
	fi
	((found != negate))
}

# render NAME ARGS... -> $TMP/NAME.yaml
render() {
	local name=$1
	shift
	"$HELM" template "$RELEASE" "$CHART" --namespace "$NS" --kube-version "$KUBE_VERSION" "$@" \
		>"$TMP/$name.yaml" 2>"$TMP/$name.err"
}

for opts in "" "--strict"; do
	if out=$("$HELM" lint $opts --kube-version "$KUBE_VERSION" "$CHART" 2>&1); then
		ok "helm lint $opts"
	else
		fail "helm lint $opts"
		echo "$out" | indent
	fi
done

for entry in "${SETS[@]}"; do
	IFS='|' read -r name args expects <<<"$entry"
	# shellcheck disable=SC2086 # args are split on purpose
	if ! out=$("$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" $args 2>&1); then
		fail "helm lint --strict [$name]"
		echo "$out" | indent
	fi
	# shellcheck disable=SC2086
	if ! render "$name" $args; then
		fail "helm template [$name]"
		indent <"$TMP/$name.err"
		continue
	fi
	missing=()
	IFS=';' read -ra patterns <<<"$expects"
	for p in "${patterns[@]}"; do
		check_pattern "$TMP/$name.yaml" "$p" || missing+=("$p")
	done
	if ((${#missing[@]})); then
		fail "helm template [$name]: rendering does not satisfy: ${missing[*]}"
	else
		ok "helm lint --strict + helm template [$name] ($(grep -c '^kind:' "$TMP/$name.yaml") objects)"
	fi
done

# --- every flag of `kube-sts run` and `kube-sts webhook` reaches its container ---
# The flags are read from src/main.rs (each has an env fallback KUBE_STS_<FLAG>), per
# subcommand (its Args struct), so a flag added there fails this check until the chart
# passes it to that subcommand's Deployment.
struct_flags() {
	awk -v s="struct $1 {" 'index($0, s) { on = 1; next } on && /^}/ { on = 0 } on' src/main.rs |
		grep -oE 'env = "KUBE_STS_[A-Z_]+"' | sed -E 's/env = "KUBE_STS_([A-Z_]+)"/\1/' | tr 'A-Z_' 'a-z-' | sort -u
}
# named_doc FILE KIND NAME: the document of FILE of that kind and metadata.name.
named_doc() {
	kind_docs "$1" "$2" | awk -v name="$3" '
		/^---/ { if (doc ~ ("\n  name: " name "\n")) printf "%s", doc; doc = "" }
		{ doc = doc $0 "\n" }
		END { if (doc ~ ("\n  name: " name "\n")) printf "%s", doc }
	'
}
if render all-flags --set watchNamespace=team-a --set region=eu-west-1 \
	--set stsEndpoint=https://sts.example.test --set leaderElection.enabled=true --set namespacePrefix=team-; then
	for pair in RunArgs:kube-sts WebhookArgs:kube-sts-webhook; do
		args=${pair%%:*} deployment=${pair#*:}
		flags=$(struct_flags "$args")
		named_doc "$TMP/all-flags.yaml" Deployment "$deployment" >"$TMP/all-flags.$args.yaml"
		if [[ -z "$flags" ]]; then
			fail "every flag of $args in Deployment $deployment: no KUBE_STS_* flags found in src/main.rs"
			continue
		fi
		missing=()
		for f in $flags; do
			grep -q -- "\"--$f=" "$TMP/all-flags.$args.yaml" || missing+=("--$f")
		done
		if ((${#missing[@]})); then
			fail "every flag of $args in Deployment $deployment: not passed: ${missing[*]}"
		else
			ok "every flag of $args in Deployment $deployment ($(echo "$flags" | wc -l) flags of src/main.rs)"
		fi
	done
else
	fail "every flag in the Deployments: helm template failed"
	indent <"$TMP/all-flags.err"
fi

# --- values the schema (or the chart) must reject ------------------------------
# name|--set argument|what the error must mention
BAD=(
	"misspelt value|replicaz=2|replicaz"
	"ill-typed value|replicas=two|replicas"
	"unknown nested value|image.tga=x|tga"
	"bad enum|logFormat=yaml|logFormat"
	"replicas>1 without leader election or shards|replicas=2|sharding.shards"
	"zero shards|sharding.shards=0|shards"
	"shards with leader election|sharding.shards=2,leaderElection.enabled=true|drop leaderElection"
	"shards with watchNamespace|sharding.shards=2,watchNamespace=team-a|drop watchNamespace"
	"shard Leases among the cluster's own|sharding.shards=2,replicas=2,leaderElection.leaseNamespace=kube-system|namespace of its own"
	"unknown NetworkPolicy peer field|networkPolicy.metricsFrom[0].namespaceSelectr.x=y|namespaceSelectr"
	"bad webhook failurePolicy|webhook.failurePolicy=Sometimes|failurePolicy"
	"webhook validity not a duration|webhook.certificate.validity=90d|validity"
	"webhook issuer kind|webhook.certManager.issuerRef.kind=Foo|kind"
	"webhook peers without networkPolicy.enabled|webhook.networkPolicy.from[0].ipBlock.cidr=10.0.0.0/28|networkPolicy.enabled=true"
	"unknown webhook NetworkPolicy peer field|webhook.networkPolicy.from[0].podSelectr.x=y|podSelectr"
)
for entry in "${BAD[@]}"; do
	IFS='|' read -r name arg mention <<<"$entry"
	if "$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" --set "$arg" >/dev/null 2>"$TMP/bad.err"; then
		fail "rejects $name (--set $arg): helm template succeeded"
	elif ! grep -q -- "$mention" "$TMP/bad.err"; then
		fail "rejects $name (--set $arg): failed, but the error does not mention $mention"
		indent <"$TMP/bad.err"
	else
		ok "rejects $name (--set $arg): $(grep -m1 -- "$mention" "$TMP/bad.err" | sed 's/^Error: //' | cut -c1-110)"
	fi
done

# --- server-side dry-run against the local control plane -----------------------
if [[ ! -f "$KUBECONFIG_E2E" ]]; then
	skip "server dry-run: $KUBECONFIG_E2E not found (make up starts the control plane)"
elif [[ "$(kubectl --kubeconfig "$KUBECONFIG_E2E" --request-timeout=5s get --raw /readyz 2>/dev/null)" != ok ]]; then
	skip "server dry-run: the API server of $KUBECONFIG_E2E does not answer /readyz"
else
	k() { kubectl --kubeconfig "$KUBECONFIG_E2E" --request-timeout=30s "$@"; }
	if out=$(k apply --server-side --force-conflicts --field-manager=kube-sts-chart-check -f "$CHART/crds/" 2>&1) &&
		out=$(k wait --for=condition=Established --timeout=60s -f "$CHART/crds/" 2>&1); then
		ok "CRDs from $CHART/crds applied (server-side) and established"
	else
		fail "apply $CHART/crds"
		echo "$out" | indent
	fi
	created_ns=1
	for ns in "$NS" "$WATCHED"; do
		k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null 2>&1 ||
			fail "create namespace $ns"
	done
	for entry in "${SETS[@]}"; do
		IFS='|' read -r name args _ <<<"$entry"
		# The watched namespace must exist for its Role: use one this script made.
		args=${args//watchNamespace=team-a/watchNamespace=$WATCHED}
		# shellcheck disable=SC2086
		if ! render "dry-$name" $args; then
			fail "server dry-run [$name]: helm template failed"
			continue
		fi
		# Drop the ServiceMonitor and cert-manager's kinds (their CRDs are not installed
		# here): they are only linted.
		awk '
			/^---/ { if (doc !~ /\nkind: (ServiceMonitor|Certificate|Issuer)\n/) printf "%s", doc; doc = "" }
			{ doc = doc $0 "\n" }
			END { if (doc !~ /\nkind: (ServiceMonitor|Certificate|Issuer)\n/) printf "%s", doc }
		' "$TMP/dry-$name.yaml" >"$TMP/dry-$name.filtered.yaml"
		dropped=$(($(grep -c '^kind:' "$TMP/dry-$name.yaml") - $(grep -c '^kind:' "$TMP/dry-$name.filtered.yaml")))
		if out=$(k apply --dry-run=server -f "$TMP/dry-$name.filtered.yaml" 2>&1); then
			ok "server dry-run [$name]: $(echo "$out" | wc -l) objects accepted$( ((dropped)) && echo ", $dropped ServiceMonitor/cert-manager objects left out")"
		else
			fail "server dry-run [$name]"
			echo "$out" | indent
		fi
	done

	# Grants installed by the chart outlive an upgrade that drops them and the uninstall
	# (helm.sh/resource-policy: keep). A real release in $NS, with the CRDs applied above.
	rel=$NS # contains the chart name: the objects are named $NS, not kube-sts
	kept=("$NS-kept-by-upgrade" "$NS-kept-by-uninstall")
	grant_args() {
		local i=0 g
		for g in "$@"; do
			echo "--set grants[$i].name=$g --set grants[$i].spec.namespaces[0]=$NS --set grants[$i].spec.roleArns[0]=arn:aws:iam::123456789012:role/chart-check"
			i=$((i + 1))
		done
	}
	h() { "$HELM" --kubeconfig "$KUBECONFIG_E2E" "$@"; }
	exists() { [[ -n "$(k get "$@" --ignore-not-found -o name 2>/dev/null)" ]]; }
	# The webhook's configuration selects only namespaces with a label nobody has.
	webhook_args=(--set-json "webhook.namespaceSelector={\"matchLabels\":{\"kube-sts.io/chart-check\":\"$NS\"}}")
	# What the webhook writes at runtime (here the cluster's own CA stands in for its
	# certificate): an upgrade must leave both alone.
	ca=$(k config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
	webhook_state() {
		echo "$(k -n "$NS" get secret "$rel-webhook-tls" -o jsonpath='{.data.ca\.crt}' 2>/dev/null)|$(k get mutatingwebhookconfiguration "$rel" -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null)"
	}
	# shellcheck disable=SC2046 # grant_args prints arguments to split
	if ! out=$(h install "$rel" "$CHART" --namespace "$NS" --skip-crds "${webhook_args[@]}" $(grant_args "${kept[@]}") 2>&1); then
		fail "helm install with grants"
		echo "$out" | indent
	elif ! exists awsrolegrant "${kept[0]}" || ! exists awsrolegrant "${kept[1]}"; then
		fail "helm install with grants: the grants were not created"
	else
		if exists mutatingwebhookconfiguration "$rel" && exists -n "$NS" secret "$rel-webhook-tls" &&
			out=$(k -n "$NS" patch secret "$rel-webhook-tls" --type merge -p "{\"data\":{\"ca.crt\":\"$ca\"}}" 2>&1) &&
			out=$(k patch mutatingwebhookconfiguration "$rel" --type json \
				-p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"}]" 2>&1); then
			ok "helm install: the webhook's configuration and its (empty) certificate Secret exist"
		else
			fail "helm install: the webhook's configuration or certificate Secret is missing, or cannot be filled"
			echo "$out" | indent
		fi
		# shellcheck disable=SC2046
		if ! out=$(h upgrade "$rel" "$CHART" --namespace "$NS" --skip-crds "${webhook_args[@]}" $(grant_args "${kept[1]}") 2>&1); then
			fail "helm upgrade dropping a grant"
			echo "$out" | indent
		elif exists awsrolegrant "${kept[0]}"; then
			ok "helm upgrade that drops a grant from the values keeps the AWSRoleGrant"
		else
			fail "helm upgrade that drops a grant from the values deleted the AWSRoleGrant ${kept[0]}"
		fi
		if [[ "$(webhook_state)" == "$ca|$ca" ]]; then
			ok "helm upgrade keeps the webhook's certificate and the caBundle it wrote"
		else
			fail "helm upgrade changed the webhook's certificate Secret or caBundle: $(webhook_state | cut -c1-80)"
		fi
		# The webhook's ServiceAccount may change only the caBundle of its configuration
		# (ValidatingAdmissionPolicy; server dry-runs, which admission sees alike; polled, as
		# a new policy takes a moment to be enforced).
		# kubectl patch reads the object first: the check lends the ServiceAccount `get` on it.
		as_webhook=(--as="system:serviceaccount:$NS:$rel-webhook")
		lent="$rel-chart-check-get"
		k create clusterrole "$lent" --verb=get --resource=mutatingwebhookconfigurations --resource-name="$rel" >/dev/null &&
			k create clusterrolebinding "$lent" --clusterrole="$lent" --serviceaccount="$NS:$rel-webhook" >/dev/null &&
			k label clusterrole,clusterrolebinding "$lent" "app.kubernetes.io/instance=$NS" >/dev/null
		patch_as_webhook() {
			k "${as_webhook[@]}" patch mutatingwebhookconfiguration "$rel" --dry-run=server --type json -p "$1" 2>&1
		}
		refused=""
		for _ in $(seq 1 30); do
			if out=$(patch_as_webhook '[{"op":"replace","path":"/webhooks/0/failurePolicy","value":"Fail"}]'); then
				sleep 1
			else
				refused=$out
				break
			fi
		done
		if [[ "$refused" == *"may change only the caBundle"* ]] &&
			! out2=$(patch_as_webhook '[{"op":"add","path":"/webhooks/0/namespaceSelector/matchLabels/x","value":"y"}]') &&
			[[ "$out2" == *"may change only the caBundle"* ]] &&
			! out3=$(patch_as_webhook '[{"op":"add","path":"/metadata/labels/x","value":"y"}]') &&
			out4=$(patch_as_webhook '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"eA=="}]') &&
			out5=$(k patch mutatingwebhookconfiguration "$rel" --dry-run=server --type json \
				-p '[{"op":"replace","path":"/webhooks/0/failurePolicy","value":"Fail"}]' 2>&1); then
			ok "the webhook's ServiceAccount may change the caBundle of its configuration and nothing else (rules, selectors, metadata); others may"
		else
			fail "ValidatingAdmissionPolicy on the webhook's configuration"
			printf '%s\n' "failurePolicy: ${refused:-$out}" "namespaceSelector: ${out2:-}" "labels: ${out3:-}" "caBundle: ${out4:-}" "admin: ${out5:-}" | indent
		fi
		k delete clusterrole,clusterrolebinding "$lent" --ignore-not-found >/dev/null 2>&1
		# A certificate Secret deleted by hand comes back with the next upgrade (empty: the
		# webhook fills it again).
		k -n "$NS" delete secret "$rel-webhook-tls" >/dev/null 2>&1
		# shellcheck disable=SC2046
		if out=$(h upgrade "$rel" "$CHART" --namespace "$NS" --skip-crds "${webhook_args[@]}" $(grant_args "${kept[1]}") 2>&1) &&
			exists -n "$NS" secret "$rel-webhook-tls"; then
			ok "helm upgrade recreates a deleted certificate Secret"
		else
			fail "helm upgrade did not recreate the deleted certificate Secret"
			echo "$out" | indent
		fi
		if ! out=$(h uninstall "$rel" --namespace "$NS" 2>&1); then
			fail "helm uninstall"
			echo "$out" | indent
		elif exists clusterrole "$rel"; then
			fail "helm uninstall left the ClusterRole $rel: cannot tell whether grants are kept"
		elif exists awsrolegrant "${kept[1]}"; then
			ok "helm uninstall keeps the AWSRoleGrants the chart installed (and removes the rest, e.g. the ClusterRole)"
		else
			fail "helm uninstall deleted the AWSRoleGrant ${kept[1]}"
		fi
		if exists mutatingwebhookconfiguration "$rel" || exists -n "$NS" secret "$rel-webhook-tls" ||
			exists validatingadmissionpolicy "$rel-cabundle-only"; then
			fail "helm uninstall left the webhook's configuration, certificate Secret or policy"
		else
			ok "helm uninstall removes the webhook's configuration, certificate Secret and policy"
		fi
	fi
	h uninstall "$rel" --namespace "$NS" >/dev/null 2>&1 || true
fi

echo
if ((failures)); then
	echo "chart-check: $failures check(s) failed"
	exit 1
fi
echo "chart-check: all checks passed"
