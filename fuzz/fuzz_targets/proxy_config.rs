//! The sidecar's bootstrap YAML (`--config`), read and validated as at startup.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proxy::config::FileConfig;
use tern_proxy::routes::Routes;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = serde_yaml::from_str::<FileConfig>(text) else {
        return;
    };
    let Ok(config) = file.validate() else {
        return;
    };
    // What /config shows.
    let shown = serde_json::to_value(&config).expect("a validated config serialises");
    // The file written back out reads and validates to the same config.
    let yaml = serde_yaml::to_string(&file).expect("a read config serialises");
    let again: FileConfig = serde_yaml::from_str(&yaml).expect("its own YAML reads back");
    let config2 = again.validate().expect("its own YAML validates");
    assert_eq!(shown, serde_json::to_value(&config2).expect("serialises"));
    // The routes the sidecar builds from the validated policies.
    let _ = Routes::single("bootstrap", config.default_policy.clone());
    for s in &config.services {
        let _ = Routes::single("bootstrap", s.policy.clone());
    }
});
