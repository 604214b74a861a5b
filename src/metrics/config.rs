//! The config-in-force metrics, shared by both sources of rules (files and xDS): loads counted
//! in `config_load_success`/`config_load_error`, the generation gauge and the hash info series.

/// Counts a config load in `config_load_success` or `config_load_error`.
pub fn count_load(ok: bool) {
    let metric = if ok {
        super::CONFIG_LOAD_SUCCESS
    } else {
        super::CONFIG_LOAD_ERROR
    };
    metrics::counter!(metric).increment(1);
}

/// Publishes the generation gauge and the hash info series of the config in force; the
/// previous hash's series drops to 0.
#[derive(Default)]
pub struct ConfigMetrics {
    /// A std Mutex: held for a swap, never across an await.
    last_hash: std::sync::Mutex<Option<String>>,
}

impl ConfigMetrics {
    pub fn publish(&self, generation: u64, hash: u64) {
        metrics::gauge!(super::CONFIG_GENERATION).set(generation as f64);
        let hash = format!("{hash:016x}");
        let mut last = match self.last_hash.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(old) = last.replace(hash.clone()) {
            if old != hash {
                metrics::gauge!(super::CONFIG_INFO, "hash" => old).set(0.0);
            }
        }
        metrics::gauge!(super::CONFIG_INFO, "hash" => hash).set(1.0);
    }
}
