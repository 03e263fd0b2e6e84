#!/usr/bin/env bash
# Checks the Helm chart charts/kube-sts: the CRD copy, `helm lint`, `helm template`
# with several value sets, rejection of misspelt and ill-typed values by
# values.schema.json, and — when the local control plane (.e2e/kubeconfig)
# answers — a server-side dry-run apply of every rendering, and a real install, upgrade
# and uninstall of a release with grants (which must be kept).
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
		kubectl --kubeconfig "$KUBECONFIG_E2E" delete awsrolegrant,clusterrole,clusterrolebinding \
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
	"defaults||image: \"kube-sts:[^\"]+\";kind: ClusterRole$;kind: ClusterRoleBinding;kind: Deployment;kind: Service$;--require-grants=true;path: /readyz;!serviceaccounts/token;!kind: NetworkPolicy"
	"watchNamespace|--set watchNamespace=team-a|kind: Role$;kind: RoleBinding;--namespace=team-a;resourceNames: \[\"team-a\"\];!serviceaccounts/token"
	"serviceAccountTokens|--set rbac.serviceAccountTokens=true|ClusterRole@resources: \[serviceaccounts/token\]"
	"serviceAccountTokens.watchNamespace|--set rbac.serviceAccountTokens=true --set watchNamespace=team-a|Role@resources: \[serviceaccounts/token\];!ClusterRole@serviceaccounts/token"
	"leaderElection|--set leaderElection.enabled=true --set replicas=2 --set podDisruptionBudget.enabled=true|kind: PodDisruptionBudget;resources: \[leases\];--leader-election=true;--lease-name=kube-sts;replicas: 2"
	"serviceMonitor|--set metrics.serviceMonitor.enabled=true|kind: ServiceMonitor"
	"grants|--set grants[0].name=team-a --set grants[0].spec.namespaces[0]=team-a --set grants[0].spec.roleArns[0]=arn:aws:iam::123456789012:role/team-a-* --set grants[0].annotations.owner=team-a|kind: AWSRoleGrant;name: team-a;AWSRoleGrant@helm.sh/resource-policy: keep;AWSRoleGrant@owner: team-a"
	"aws.existingSecret|--set aws.existingSecret=x|envFrom:;name: x$"
	"networkPolicy|--set networkPolicy.enabled=true --set metrics.port=9090 --set-json networkPolicy.metricsFrom=[{\"namespaceSelector\":{\"matchLabels\":{\"team\":\"monitoring\"}},\"podSelector\":{\"matchLabels\":{\"app\":\"prometheus\"}}}]|NetworkPolicy@port: 9090;NetworkPolicy@- Ingress;NetworkPolicy@team: monitoring;NetworkPolicy@app: prometheus;NetworkPolicy@app.kubernetes.io/name: kube-sts;!NetworkPolicy@Egress"
	"networkPolicy.noPeers|--set networkPolicy.enabled=true|NetworkPolicy@ingress: \[\];!NetworkPolicy@from:;!NetworkPolicy@Egress"
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
		kind_docs "$file" "${BASH_REMATCH[1]}" | grep -Eq -- "${BASH_REMATCH[2]}" && found=1
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

# --- every flag of `kube-sts run` reaches the container ------------------------
# The flags are read from src/main.rs (each has an env fallback KUBE_STS_<FLAG>),
# so a flag added there fails this check until the chart passes it.
flags=$(grep -oE 'env = "KUBE_STS_[A-Z_]+"' src/main.rs | sed -E 's/env = "KUBE_STS_([A-Z_]+)"/\1/' |
	tr 'A-Z_' 'a-z-' | sort -u)
if [[ -z "$flags" ]]; then
	fail "every operator flag in the Deployment: no KUBE_STS_* flags found in src/main.rs"
elif render all-flags --set watchNamespace=team-a --set region=eu-west-1 \
	--set stsEndpoint=https://sts.example.test --set leaderElection.enabled=true; then
	missing=()
	for f in $flags; do
		grep -q -- "\"--$f=" "$TMP/all-flags.yaml" || missing+=("--$f")
	done
	if ((${#missing[@]})); then
		fail "every operator flag in the Deployment: not passed: ${missing[*]}"
	else
		ok "every operator flag in the Deployment ($(echo "$flags" | wc -l) flags of src/main.rs)"
	fi
else
	fail "every operator flag in the Deployment: helm template failed"
	indent <"$TMP/all-flags.err"
fi

# --- values the schema (or the chart) must reject ------------------------------
# name|--set argument|what the error must mention
BAD=(
	"misspelt value|replicaz=2|replicaz"
	"ill-typed value|replicas=two|replicas"
	"unknown nested value|image.tga=x|tga"
	"bad enum|logFormat=yaml|logFormat"
	"replicas>1 without leader election|replicas=2|leaderElection"
	"unknown NetworkPolicy peer field|networkPolicy.metricsFrom[0].namespaceSelectr.x=y|namespaceSelectr"
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
		# Drop the ServiceMonitor (its CRD is not installed here): it is only linted.
		awk '
			/^---/ { if (doc !~ /\nkind: ServiceMonitor\n/) printf "%s", doc; doc = "" }
			{ doc = doc $0 "\n" }
			END { if (doc !~ /\nkind: ServiceMonitor\n/) printf "%s", doc }
		' "$TMP/dry-$name.yaml" >"$TMP/dry-$name.filtered.yaml"
		dropped=$(($(grep -c '^kind:' "$TMP/dry-$name.yaml") - $(grep -c '^kind:' "$TMP/dry-$name.filtered.yaml")))
		if out=$(k apply --dry-run=server -f "$TMP/dry-$name.filtered.yaml" 2>&1); then
			ok "server dry-run [$name]: $(echo "$out" | wc -l) objects accepted$( ((dropped)) && echo ", $dropped ServiceMonitor left out")"
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
	exists() { [[ -n "$(k get "$1" "$2" --ignore-not-found -o name 2>/dev/null)" ]]; }
	# shellcheck disable=SC2046 # grant_args prints arguments to split
	if ! out=$(h install "$rel" "$CHART" --namespace "$NS" --skip-crds $(grant_args "${kept[@]}") 2>&1); then
		fail "helm install with grants"
		echo "$out" | indent
	elif ! exists awsrolegrant "${kept[0]}" || ! exists awsrolegrant "${kept[1]}"; then
		fail "helm install with grants: the grants were not created"
	else
		# shellcheck disable=SC2046
		if ! out=$(h upgrade "$rel" "$CHART" --namespace "$NS" --skip-crds $(grant_args "${kept[1]}") 2>&1); then
			fail "helm upgrade dropping a grant"
			echo "$out" | indent
		elif exists awsrolegrant "${kept[0]}"; then
			ok "helm upgrade that drops a grant from the values keeps the AWSRoleGrant"
		else
			fail "helm upgrade that drops a grant from the values deleted the AWSRoleGrant ${kept[0]}"
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
	fi
	h uninstall "$rel" --namespace "$NS" >/dev/null 2>&1 || true
fi

echo
if ((failures)); then
	echo "chart-check: $failures check(s) failed"
	exit 1
fi
echo "chart-check: all checks passed"
