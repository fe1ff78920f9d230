//! What a [`KeyActor`] answers: reservations, settlements, snapshots, spec and health changes.

use actix::{Context, Handler};

use tokio::time::Instant;

use super::{Health, KeyActor, KeyState, Window};
use crate::messages::{Outcome, Refusal, Reserve, Settle, Snapshot};

impl Handler<Reserve> for KeyActor {
    type Result = Result<(), Refusal>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        match self.health {
            Health::Disabled { .. } => return Err(Refusal::Disabled),
            Health::CoolingUntil(until) if until > now => return Err(Refusal::Cooling { until }),
            Health::CoolingUntil(_) => {
                self.health = Health::Healthy;
                self.publish_health();
            }
            Health::Healthy => {}
        }
        let mut free = now;
        let share = u64::from(msg.share_of.max(1));
        if let Some(rpm) = self.key.rpm {
            let rpm = (u64::from(rpm) / share).max(1);
            free = free.max(self.requests.free_at(now, rpm, 1));
        }
        if let Some(tpm) = self.key.tpm {
            free = free.max(
                self.tokens
                    .free_at(now, (tpm / share).max(1), msg.est_tokens),
            );
        }
        if free > now {
            return Err(Refusal::Budget { until: free });
        }
        self.admit(now, msg.lease_id, msg.est_tokens, ctx);
        Ok(())
    }
}

impl Handler<Settle> for KeyActor {
    type Result = ();

    fn handle(&mut self, msg: Settle, ctx: &mut Context<Self>) {
        // successes counted before this outcome reset the failure streaks first
        self.fold(ctx);
        let now = Instant::now();
        if let Outcome::Success {
            tokens: Some(tokens),
            ..
        } = msg.outcome
        {
            self.tokens.settle(now, msg.lease_id, tokens);
        }
        self.tally.telemetry.metrics().attempt(
            &self.key.name,
            self.key.kind.as_str(),
            msg.outcome.label(),
            msg.elapsed,
        );
        self.apply(&msg.outcome, now, msg.admitted);
        self.publish_window(ctx);
        self.tally.settle_handled();
    }
}

impl Handler<Snapshot> for KeyActor {
    type Result = actix::MessageResult<Snapshot>;

    fn handle(&mut self, _: Snapshot, ctx: &mut Context<Self>) -> Self::Result {
        self.fold(ctx);
        let now = Instant::now();
        if matches!(self.health, Health::CoolingUntil(t) if t <= now) {
            self.health = Health::Healthy;
            self.publish_health();
        }
        actix::MessageResult(KeyState {
            name: self.key.name.to_string(),
            health: self.health.clone(),
            window_requests: self.requests.used(now),
            window_tokens: self.tokens.used(now),
            rpm: self.key.rpm,
            tpm: self.key.tpm,
            in_flight: self.tally.in_flight(),
            counters: self.counters.clone(),
            latency_ms: self.latency_ms,
            enabled: !self.admin_disabled,
        })
    }
}

impl Handler<crate::messages::ReplaceSpec> for KeyActor {
    type Result = ();

    fn handle(&mut self, msg: crate::messages::ReplaceSpec, ctx: &mut Context<Self>) {
        let new = msg.0;
        // a budget that appears or disappears changes the window's kind: that window restarts
        if new.rpm.is_some() != self.key.rpm.is_some() {
            self.requests = Window::calls(new.rpm.is_some(), self.epoch);
        }
        if new.tpm.is_some() != self.key.tpm.is_some() {
            self.tokens = Window::new(new.tpm.is_some(), self.epoch);
        }
        self.key = new;
        self.publish_window(ctx);
    }
}

impl Handler<crate::messages::RemoteHealth> for KeyActor {
    type Result = ();

    fn handle(&mut self, msg: crate::messages::RemoteHealth, _: &mut Context<Self>) {
        let now = Instant::now();
        match msg.0 {
            crate::HealthEvent::Cooling(d) => {
                let until = now + d;
                match self.health {
                    Health::Disabled { .. } => {}
                    Health::CoolingUntil(t) if t >= until => {}
                    _ => {
                        tracing::info!(key = %self.key.name, cooldown_ms = d.as_millis() as u64, "key cooling down (seen by another replica)");
                        self.health = Health::CoolingUntil(until);
                        self.publish_health();
                    }
                }
            }
            crate::HealthEvent::Disabled(reason) => {
                if !matches!(self.health, Health::Disabled { .. }) {
                    tracing::warn!(key = %self.key.name, "key disabled (seen by another replica)");
                    self.counters.last_error = Some(reason.clone());
                    self.health = Health::Disabled { reason };
                    self.publish_health();
                }
            }
        }
    }
}

impl Handler<crate::messages::Enable> for KeyActor {
    type Result = ();

    fn handle(&mut self, msg: crate::messages::Enable, _: &mut Context<Self>) {
        self.admin_disabled = !msg.0;
        self.health = if msg.0 {
            match &self.key.unusable {
                Some(reason) => Health::Disabled {
                    reason: reason.clone(),
                },
                None => Health::Healthy,
            }
        } else {
            Health::Disabled {
                reason: "disabled by an admin".to_owned(),
            }
        };
        if msg.0 {
            self.consecutive_failures = 0;
            self.consecutive_429 = 0;
            self.cooldowns_in_row = 0;
        }
        self.publish_health();
    }
}
