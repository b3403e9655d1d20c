//! Arbitrary bytes as a transaction body: parsing must never panic, and reading the fields the
//! handler reads from each event must not either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_k8s_toggle::appservice::parse_transaction;

fuzz_target!(|data: &[u8]| {
    let Ok(txn) = parse_transaction("t", data) else {
        return;
    };
    for event in &txn.events {
        let _ = event.get_field::<String>("type");
        let _ = event.get_field::<String>("event_id");
        let _ = event.json().get();
    }
});
