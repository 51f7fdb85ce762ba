//! Bootstrap tokens as tern-control verifies them, and claims as
//! `ternctl token create` signs them.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tern_identity::token::{Claims, TokenError, TokenKey};

const KEY: &[u8; 32] = b"tern fuzz key, not for real use.";

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::new(KEY);
    let other = TokenKey::new(b"another key");
    let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let text = String::from_utf8_lossy(data);
    if let Ok(claims) = key.verify(&text, now) {
        // Only a token minted with the key gets here (a seed, or one the fuzzer copied).
        assert!(claims.expires.is_none_or(|exp| exp > 1_900_000_000));
        assert_eq!(other.verify(&text, now), Err(TokenError::BadSignature));
    }

    let Ok(claims) = serde_json::from_slice::<Claims>(data) else {
        return;
    };
    let token = key.sign(&claims);
    let expired = claims.expires.is_some_and(|exp| exp <= 1_900_000_000);
    match key.verify(&token, now) {
        Ok(back) => assert!(
            !expired && back == claims,
            "{claims:?} came back as {back:?}"
        ),
        Err(e) => assert!(expired && e == TokenError::Expired, "{claims:?}: {e}"),
    }
    assert_eq!(other.verify(&token, now), Err(TokenError::BadSignature));
    // No one-byte change yields another valid token.
    let mut bytes = token.into_bytes();
    let i = usize::from(data[0]) * 7 % bytes.len();
    bytes[i] ^= data.last().copied().filter(|b| *b != 0).unwrap_or(1);
    if let Ok(forged) = String::from_utf8(bytes) {
        if let Ok(back) = key.verify(&forged, now) {
            assert_eq!(forged.trim(), key.sign(&back), "{forged:?} verified");
        }
    }
});
