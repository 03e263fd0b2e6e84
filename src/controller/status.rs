//! Binding status: conditions from the subjects' outcomes, written with server-side apply
//! only when it changed.

use super::*;

pub(super) fn binding_ready_reason(binding: &AWSRoleBinding) -> Option<&str> {
    binding
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str())
}

pub(super) fn apply_verdict(
    status: &mut AWSRoleBindingStatus,
    binding: &AWSRoleBinding,
    verdict: &conditions::Verdict,
    now: Timestamp,
) {
    let generation = binding.metadata.generation;
    status.observed_generation = generation;
    let (ready, reason, message) = &verdict.ready;
    conditions::set_condition(&mut status.conditions, READY, *ready, *reason, message, generation, now);
    let (degraded, reason, message) = &verdict.degraded;
    conditions::set_condition(
        &mut status.conditions,
        DEGRADED,
        *degraded,
        *reason,
        message,
        generation,
        now,
    );
}

pub(super) fn build_status(
    binding: &AWSRoleBinding,
    current: Option<AWSRoleBindingStatus>,
    plan: &BindingPlan,
    results: &mut [SubjectResult],
    problem: Option<(Reason, String)>,
    now: Timestamp,
) -> AWSRoleBindingStatus {
    let mut status = current.unwrap_or_default();
    let outcomes: Vec<SubjectOutcome> = results.iter().map(|r| r.outcome.clone()).collect();
    let mut notes: Vec<String> = plan.note.iter().cloned().collect();
    for note in results.iter().filter_map(|r| r.note.clone()) {
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    let verdict = conditions::binding_verdict(problem, &outcomes, note.as_deref());
    apply_verdict(&mut status, binding, &verdict, now);
    status.subjects = results.iter().map(|r| r.status.clone()).collect();
    status.expiration = status
        .subjects
        .iter()
        .filter_map(|s| s.expiration.clone())
        .min_by_key(|t| t.0);
    status.next_refresh_time = status
        .subjects
        .iter()
        .filter_map(|s| s.next_refresh_time.clone())
        .min_by_key(|t| t.0);
    status
}

/// Writes status with server-side apply, only when it differs from what is there.
pub(super) async fn write_status(binding: &AWSRoleBinding, status: AWSRoleBindingStatus, ctx: &Context) -> Result<()> {
    if ctx.current_status(binding).as_ref() == Some(&status) {
        return Ok(());
    }
    let key = binding_key(binding);
    let api: Api<AWSRoleBinding> = Api::namespaced(ctx.client.clone(), &key.0);
    let patch = json!({
        "apiVersion": "kube-sts.io/v1alpha1",
        "kind": "AWSRoleBinding",
        "status": status,
    });
    match api
        .patch_status(
            &binding.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(answer) => {
            ctx.metrics.api_write("awsrolebindings/status", "apply");
            let written = WrittenStatus {
                written_from: binding.resource_version().unwrap_or_default(),
                answered: answer.resource_version(),
                status,
            };
            ctx.stores
                .written_statuses
                .lock()
                .expect("status lock")
                .0
                .insert(key, written);
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}
