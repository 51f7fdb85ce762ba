//! SPIFFE ids, from config, snapshots and peer certificates; the bytes are
//! also read as a DER certificate, as a peer's would be.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_identity::spiffe::{spiffe_id_of, validity};
use tern_identity::SpiffeId;
use tern_proxy::authz::{Action, PeerMatch, Policy, Rule};

fuzz_target!(|data: &[u8]| {
    let _ = spiffe_id_of(data);
    let _ = validity(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = SpiffeId::parse(s) else {
        return;
    };
    // It displays as it was written; only the trust domain is case-folded.
    let shown = id.to_string();
    assert!(shown.eq_ignore_ascii_case(s), "{s:?} shown as {shown:?}");
    assert_eq!(
        shown
            .strip_prefix("spiffe://")
            .and_then(|r| r.split_once('/'))
            .map(|(_, p)| p),
        s.strip_prefix("spiffe://")
            .and_then(|r| r.split_once('/'))
            .map(|(_, p)| p)
    );
    assert_eq!(SpiffeId::parse(&shown).as_ref(), Ok(&id));
    let parts = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account());
    assert_eq!(parts.as_ref(), Ok(&id));
    // Authorization recognises the same id in a peer certificate's URI SAN.
    let rule = Rule {
        from: vec![PeerMatch::Exact(id.clone())],
        methods: Vec::new(),
    };
    let policy = Policy::new(None, Action::Deny, vec![rule]);
    assert!(policy.allows(Some(s), None), "{s:?} is not its own peer");
    assert!(policy.allows(Some(&shown), None));
});
