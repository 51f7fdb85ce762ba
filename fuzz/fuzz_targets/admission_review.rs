//! The mutating webhook: an AdmissionReview from the API server in, the
//! review with its JSON patch out.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tern_control::webhook::review::{review, Decision};
use tern_inject::Options;

fuzz_target!(|data: &[u8]| {
    let options = Options::default();
    let Ok(answer) = review(data, &options) else {
        return;
    };
    // serde_json skips the fields review ignores without checking their UTF-8.
    let text = String::from_utf8_lossy(data);
    let request: Value = serde_json::from_str(&text).expect("review read it as JSON");
    let rsp = &answer.body["response"];
    assert_eq!(rsp["uid"], request["request"]["uid"]);
    match &answer.decision {
        Decision::Injected { operations } => {
            assert_eq!(rsp["allowed"], true);
            let b64 = rsp["patch"].as_str().expect("a patch");
            let json = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            let patch: json_patch::Patch = serde_json::from_slice(&json).expect("a JSON patch");
            assert_eq!(patch.0.len(), *operations);
            // The API server applies the patch to the object it sent.
            let mut pod = request["request"]["object"].clone();
            json_patch::patch(&mut pod, &patch).expect("the patch applies to its pod");
            // Injecting twice is the same as once.
            let mut again = request.clone();
            again["request"]["object"] = pod;
            let body = serde_json::to_vec(&again).expect("JSON");
            let second = review(&body, &options).expect("the patched review reads");
            assert!(
                matches!(second.decision, Decision::Unchanged(_)),
                "{:?}",
                second.decision
            );
        }
        Decision::Unchanged(_) => {
            assert_eq!(rsp["allowed"], true);
            assert!(rsp.get("patch").is_none());
        }
        Decision::Denied(_) => assert_eq!(rsp["allowed"], false),
    }
});
