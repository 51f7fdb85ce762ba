//! tern-control's mesh config: a YAML file of Kubernetes-style documents,
//! parsed and validated as the config watcher does. Whatever it accepts, the
//! snapshots built from it must be accepted by every sidecar.
#![no_main]

use std::path::PathBuf;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_control::config::{parse_files, Action};
use tern_control::registry::Registry;
use tern_control::snapshot::{inbound_policy, service_view};
use tern_proxy::config::policy::PolicyFile;
use tern_proxy::control::convert;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let files = [(PathBuf::from("mesh.yaml"), text.to_owned())];
    let config = match parse_files(&files) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.0.is_empty(), "refused without a reason");
            return;
        }
    };
    let registry = Registry::new(Duration::from_secs(30));
    let base = PolicyFile::default()
        .validate("defaults")
        .expect("defaults validate");
    let keys = config
        .services
        .keys()
        .chain(config.endpoints.keys())
        .chain(config.traffic.keys());
    for key in keys.chain(config.authorization.keys()) {
        if let Some(view) = service_view(key, &config, &registry) {
            if let Err(e) = convert::service(&view, &base) {
                panic!("the sidecar refuses what tern-control accepted: {e}");
            }
        }
        let policy = inbound_policy(&config, key, Action::Deny);
        if let Err(e) = convert::inbound(Some(&policy)) {
            panic!("the sidecar refuses what tern-control accepted: {e}");
        }
    }
});
