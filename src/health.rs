//! Health: healthy while every tracked component is, as the reference's health checker does.
//!
//! Components: `sigterm` (fails at shutdown, never recovers), `config` (only with
//! `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED=true`: healthy once a config with a domain is in
//! force), `backend` (only with `REDIS_HEALTH_CHECK_ACTIVE_CONNECTION=true`: follows a
//! periodic PING). `/healthcheck`, `grpc.health.v1` and the `ratelimitd_healthy` gauge all
//! report the same state.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use tonic_health::server::HealthReporter;

/// A tracked part of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Sigterm,
    Config,
    Backend,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Sigterm => "sigterm",
            Component::Config => "config",
            Component::Backend => "backend",
        }
    }
}

/// The service's health.
pub struct Health {
    /// Components and whether each is healthy. A std Mutex: it is held for a map update and
    /// never across an await.
    components: Mutex<BTreeMap<Component, bool>>,
    healthy: Arc<AtomicBool>,
    reporter: HealthReporter,
    /// gRPC service names whose status follows ours ("" is the server as a whole).
    services: Vec<&'static str>,
}

impl Health {
    /// Starts with `tracked` components unhealthy (besides `Sigterm`, healthy until shutdown).
    pub fn new(
        reporter: HealthReporter,
        tracked: &[Component],
        services: Vec<&'static str>,
    ) -> Self {
        let mut components = BTreeMap::from([(Component::Sigterm, true)]);
        for c in tracked {
            components.insert(*c, false);
        }
        let h = Self {
            healthy: Arc::new(AtomicBool::new(false)),
            components: Mutex::new(components),
            reporter,
            services,
        };
        h.publish();
        h
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Marks `component` healthy or not; untracked components are ignored.
    pub fn set(&self, component: Component, ok: bool) {
        let changed = {
            let mut map = match self.components.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            match map.get_mut(&component) {
                Some(v) if *v != ok => {
                    *v = ok;
                    true
                }
                _ => false,
            }
        };
        if changed {
            // A person is needed when a component fails on its own; shutdown and recoveries
            // are routine.
            if ok || component == Component::Sigterm {
                tracing::info!(
                    component = component.name(),
                    healthy = ok,
                    "health component changed"
                );
            } else {
                tracing::warn!(
                    component = component.name(),
                    healthy = ok,
                    "health component changed"
                );
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let all = match self.components.lock() {
            Ok(m) => m.values().all(|v| *v),
            Err(poisoned) => poisoned.into_inner().values().all(|v| *v),
        };
        let was = self.healthy.swap(all, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::HEALTHY).set(if all { 1.0 } else { 0.0 });
        if was != all {
            // The component's line above says why, at the level it deserves.
            tracing::info!(healthy = all, "health changed");
        }
        let reporter = self.reporter.clone();
        let services = self.services.clone();
        let healthy = self.healthy.clone();
        // The reporter is async; publishing is fire-and-forget. The task reads the state when
        // it runs, so tasks finishing out of order still leave the latest state published.
        tokio::spawn(async move {
            let status = if healthy.load(Ordering::Acquire) {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for s in services {
                reporter.set_service_status(s, status).await;
            }
        });
    }
}
