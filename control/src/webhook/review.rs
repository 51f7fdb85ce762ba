//! `AdmissionReview` v1 in, `AdmissionReview` v1 out: the webhook's decision, with no I/O.
//!
//! The types follow `admission.k8s.io/v1` (k8s-openapi has no admission API): the request's
//! `uid`, `kind`, `operation` and `object`; the response's `uid`, `allowed`, and for a change
//! `patchType: JSONPatch` with the RFC 6902 patch base64-encoded. The patch is the difference
//! between the Pod as it came and the Pod as `tern_inject` injects it, so applying it gives
//! exactly what `ternctl inject` prints for the same Pod.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tern_inject::{Options, Outcome};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    /// Kept as YAML's value type, which keeps the order of the keys.
    #[serde(default)]
    object: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

/// What the webhook answered, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed with a patch of this many operations.
    Injected { operations: usize },
    /// Allowed as it is (the outcome, or why the object is none of ours).
    Unchanged(String),
    /// Refused: the Pod cannot be injected (a malformed spec, a bad Tern annotation).
    Denied(String),
}

impl Decision {
    /// The `result` label of `tern_control_webhook_reviews_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Decision::Injected { .. } => "injected",
            Decision::Unchanged(_) => "unchanged",
            Decision::Denied(_) => "denied",
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back.
    pub body: Value,
    pub decision: Decision,
    /// `namespace/name` (or kind) of the object, for the log line.
    pub object: String,
}

/// Decides a review; `Err` is a request that is no AdmissionReview v1 (HTTP 400).
pub fn review(body: &[u8], options: &Options) -> Result<Answer, String> {
    let review: Review =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.api_version != API_VERSION || review.kind != KIND {
        return Err(format!(
            "expected apiVersion {API_VERSION} and kind {KIND}, got {} {}",
            review.api_version, review.kind
        ));
    }
    let request = review
        .request
        .ok_or_else(|| "the AdmissionReview has no request".to_owned())?;
    let name = request
        .name
        .clone()
        .or_else(|| {
            request
                .object
                .as_ref()
                .and_then(|o| o.get("metadata"))
                .and_then(|m| m.get("generateName"))
                .and_then(serde_yaml::Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    let object = format!(
        "{}/{}/{name}",
        request.kind.kind,
        request.namespace.as_deref().unwrap_or("")
    );
    let mut response = json!({ "uid": request.uid, "allowed": true });
    let decision = match decide(&request, options) {
        Verdict::Patch { json, operations } => {
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(json));
            Decision::Injected { operations }
        }
        Verdict::Leave(why) => Decision::Unchanged(why),
        Verdict::Refuse(message) => {
            response["allowed"] = json!(false);
            response["status"] = json!({
                "code": 400,
                "reason": "BadRequest",
                "message": format!("tern injection: {message}"),
            });
            Decision::Denied(message)
        }
    };
    Ok(Answer {
        body: json!({ "apiVersion": API_VERSION, "kind": KIND, "response": response }),
        decision,
        object,
    })
}

enum Verdict {
    Patch { json: Vec<u8>, operations: usize },
    Leave(String),
    Refuse(String),
}

fn decide(request: &Request, options: &Options) -> Verdict {
    let gvk = &request.kind;
    if (gvk.group.as_str(), gvk.version.as_str(), gvk.kind.as_str()) != ("", "v1", "Pod") {
        return Verdict::Leave(format!(
            "{}/{} {} is not a Pod",
            gvk.group, gvk.version, gvk.kind
        ));
    }
    if let Some(op) = request.operation.as_deref().filter(|op| *op != "CREATE") {
        return Verdict::Leave(format!("operation {op}: only CREATE is injected"));
    }
    let Some(original) = &request.object else {
        return Verdict::Refuse("the request carries no object".to_owned());
    };
    let mut injected = original.clone();
    let outcome = match tern_inject::inject_object(&mut injected, options) {
        Ok(o) => o,
        Err(e) => return Verdict::Refuse(format!("pod {e}")),
    };
    if !matches!(outcome, Outcome::Injected { .. }) {
        return Verdict::Leave(outcome.to_string());
    }
    let (before, after) = match (
        serde_json::to_value(original),
        serde_json::to_value(&injected),
    ) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(e), _) | (_, Err(e)) => return Verdict::Refuse(format!("the pod is not JSON: {e}")),
    };
    let patch = json_patch::diff(&before, &after);
    match serde_json::to_vec(&patch) {
        Ok(json) => Verdict::Patch {
            json,
            operations: patch.0.len(),
        },
        Err(e) => Verdict::Refuse(format!("patch: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POD: &str = r#"{
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "pay-v2-7d9f8c6b5-",
            "namespace": "default",
            "labels": {"app": "pay", "version": "v2", "pod-template-hash": "7d9f8c6b5"}
        },
        "spec": {
            "serviceAccountName": "pay",
            "containers": [{
                "name": "pay",
                "image": "tern/demo:0.1.0",
                "ports": [{"containerPort": 50051, "protocol": "TCP"}]
            }]
        }
    }"#;

    fn request(kind: &str, operation: &str, object: &str) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{
                "uid":"705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind":{{"group":"","version":"v1","kind":"{kind}"}},
                "resource":{{"group":"","version":"v1","resource":"pods"}},
                "namespace":"default","operation":"{operation}",
                "userInfo":{{"username":"system:serviceaccount:kube-system:replicaset-controller"}},
                "object":{object},"oldObject":null,"dryRun":false}}}}"#
        )
        .into_bytes()
    }

    fn response(answer: &Answer) -> &Value {
        assert_eq!(answer.body["apiVersion"], API_VERSION);
        assert_eq!(answer.body["kind"], KIND);
        assert_eq!(
            answer.body["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        &answer.body["response"]
    }

    #[test]
    fn a_pod_gets_the_patch_that_makes_it_what_the_cli_prints() {
        let options = Options::default();
        let answer = review(&request("Pod", "CREATE", POD), &options).unwrap();
        let rsp = response(&answer);
        assert_eq!(rsp["allowed"], true);
        assert_eq!(rsp["patchType"], "JSONPatch");
        assert!(matches!(answer.decision, Decision::Injected { operations } if operations > 0));
        assert_eq!(answer.object, "Pod/default/pay-v2-7d9f8c6b5-*");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(rsp["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut pod: Value = serde_json::from_str(POD).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();

        let mut cli: serde_yaml::Value = serde_json::from_str(POD).unwrap();
        tern_inject::inject_object(&mut cli, &options).unwrap();
        assert_eq!(pod, serde_json::to_value(&cli).unwrap());
        assert_eq!(pod["spec"]["containers"][1]["name"], "tern-proxy");
    }

    #[test]
    fn what_is_not_a_new_pod_to_inject_is_allowed_as_it_is() {
        let options = Options::default();
        let mut injected: serde_yaml::Value = serde_json::from_str(POD).unwrap();
        tern_inject::inject_object(&mut injected, &options).unwrap();
        let injected = serde_json::to_string(&injected).unwrap();
        let opted_out = POD.replace(
            r#""namespace": "default","#,
            r#""namespace": "default", "annotations": {"tern.dev/inject": "disabled"},"#,
        );
        for (kind, operation, object) in [
            (
                "Service",
                "CREATE",
                r#"{"apiVersion":"v1","kind":"Service"}"#,
            ),
            ("Pod", "UPDATE", POD),
            ("Pod", "CREATE", injected.as_str()),
            ("Pod", "CREATE", opted_out.as_str()),
        ] {
            let answer = review(&request(kind, operation, object), &options).unwrap();
            let rsp = response(&answer);
            assert_eq!(rsp["allowed"], true, "{kind} {operation}");
            assert!(rsp.get("patch").is_none(), "{kind} {operation}");
            assert!(matches!(answer.decision, Decision::Unchanged(_)));
        }
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_refused_with_the_reason() {
        let bad = POD.replace(r#""app": "pay""#, r#""app": "Pay!""#);
        let answer = review(&request("Pod", "CREATE", &bad), &Options::default()).unwrap();
        let rsp = response(&answer);
        assert_eq!(rsp["allowed"], false);
        assert_eq!(rsp["status"]["code"], 400);
        let message = rsp["status"]["message"].as_str().unwrap();
        assert!(message.contains("is not a service name"), "{message}");
        assert_eq!(answer.decision.result(), "denied");
    }

    #[test]
    fn anything_but_an_admission_review_v1_is_a_bad_request() {
        let options = Options::default();
        for body in [
            b"not json".to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#
                .to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        ] {
            assert!(review(&body, &options).is_err());
        }
    }
}
