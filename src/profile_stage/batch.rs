//! One batch: each record applied to its profile and the segments it can affect evaluated; the
//! changes noted for emission, and at the end the membership changes noted for the next save.

use super::*;

/// One batch in progress.
pub(super) struct Batch<'s> {
    pub(super) stage: &'s mut Stage,
}

/// The fields of a message the profile stage reads.
#[derive(Deserialize)]
pub(super) struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    pub(super) kind: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) event: Option<JsonStr<'a>>,
    #[serde(rename = "userId", borrow)]
    pub(super) user_id: Option<JsonStr<'a>>,
    #[serde(rename = "anonymousId", borrow)]
    pub(super) anonymous_id: Option<JsonStr<'a>>,
    #[serde(rename = "previousId", borrow)]
    pub(super) previous_id: Option<JsonStr<'a>>,
    #[serde(borrow)]
    pub(super) timestamp: Option<JsonStr<'a>>,
    #[serde(borrow)]
    pub(super) properties: Option<&'a RawValue>,
    #[serde(borrow)]
    pub(super) traits: Option<&'a RawValue>,
}

/// Counts what the profiles' caps dropped.
pub(super) fn count_drops(metrics: &ProfileStageMetrics, dropped: Dropped) {
    for (what, n) in [
        (Capped::EventName, dropped.event_names),
        (Capped::Trait, dropped.traits),
        (Capped::History, dropped.history),
        (Capped::AnonymousId, dropped.anonymous_ids),
    ] {
        if n > 0 {
            metrics.capped.get_or_create(&CapLabels { what }).inc_by(n);
        }
    }
}

/// A batch that runs longer than this (the stage behind, a burst of timers) appends what it has
/// emitted so far before going on: a change's delay includes the rest of its batch.
pub(super) const EMIT_EVERY: Duration = Duration::from_millis(10);

impl Stage {
    /// The end of a batch: appends what it emitted to the log, deletes the profiles merged away,
    /// and notes the membership changes of the profiles it touched. Those profiles, with their
    /// memberships and timers, are written by the next save.
    pub(super) fn settle(&mut self) -> Result<(), StageError> {
        self.append_emissions()?;
        let writes = &mut self.writes;
        for gone in self.removed.drain(..) {
            for key in gone.stored_members {
                *writes.size_delta.entry(key.clone()).or_default() -= 1;
                writes.members.push((key, gone.id, false));
            }
            writes.timers.push((gone.id, gone.stored_recheck, None));
            writes.deletes.push(gone.id);
        }
        for id in std::mem::take(&mut self.touched) {
            // Profiles merged away this batch are no longer in the cache.
            self.cache.resize(id);
            let Some(held) = self.cache.get_mut(id) else {
                continue;
            };
            held.touched = false;
            // Here rather than at the hand-off, which would walk every changed profile at once
            // (and, long after this batch, mostly out of the CPU's caches).
            if std::mem::take(&mut held.memberships_changed) {
                let writes = &mut self.writes;
                let (entered, left) = membership_changes(&held.stored_members, &held.profile);
                for key in entered {
                    *writes.size_delta.entry(key.clone()).or_default() += 1;
                    held.stored_members.insert(key.clone());
                    writes.members.push((key, id, true));
                }
                for key in left {
                    *writes.size_delta.entry(key.clone()).or_default() -= 1;
                    held.stored_members.remove(&key);
                    writes.members.push((key, id, false));
                }
            }
        }
        Ok(())
    }
}

impl Batch<'_> {
    /// Appends what the batch has emitted so far once it has run [`EMIT_EVERY`] since `since`
    /// (the batch's start or the last such append). Safe mid-batch: a redo emits the same
    /// messages with the same messageIds, and the dedup drops those already in the log.
    pub(super) fn emit_if_long(&mut self, since: &mut Instant) -> Result<(), StageError> {
        if since.elapsed() >= EMIT_EVERY {
            self.stage.append_emissions()?;
            *since = Instant::now();
        }
        Ok(())
    }

    pub(super) fn message(&mut self, set: &SegmentSet, entry: &Entry) -> Result<(), StageError> {
        let Ok(m) = serde_json::from_slice::<Fields>(entry.body) else {
            return Ok(());
        };
        let Some(kind) = MessageType::parse(&m.kind) else {
            return Ok(());
        };
        let ids = Identifiers {
            user_id: m.user_id.as_deref(),
            anonymous_id: m.anonymous_id.as_deref(),
            previous_id: m
                .previous_id
                .as_deref()
                .filter(|_| kind == MessageType::Alias),
        };
        let Some(resolved) = identity::resolve(self, ids, &set.retention)? else {
            return Ok(());
        };
        let metrics = self.stage.metrics.clone();
        metrics.messages.inc();
        if resolved.absorbed.is_some() {
            metrics.merges.inc();
            // The merge brought in the other profile's memberships.
            self.held(resolved.id)?.memberships_changed = true;
        }
        if resolved.conflict {
            metrics.conflicts.inc();
            let quiet = self
                .stage
                .last_conflict_log
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
            if !quiet {
                self.stage.last_conflict_log = Some(Instant::now());
                tracing::warn!(
                    message_id = entry.message_id,
                    "identity conflict: a message links two different userIds; not merged (logged at most every 10 s)"
                );
            }
        }
        let now_ms = self.stage.time;
        // A message happened when its timestamp says, but not after it arrived: a device whose
        // clock runs ahead (and no `sentAt` for the edge to correct it by) would otherwise be
        // seen in the future, outside every window until then and with no timer for it.
        let arrived = entry.received_at_micros.div_euclid(1_000);
        let at = m
            .timestamp
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(arrived, |t| t.timestamp_millis().min(arrived));
        let event = event_name(kind, m.event.as_deref());
        let observed = Observed {
            kind,
            event,
            at,
            properties: m.properties,
            traits: m.traits,
        };
        let message = Message {
            name: event.unwrap_or_default(),
            at,
            now: now_ms,
            properties: (if kind == MessageType::Identify {
                m.traits
            } else {
                m.properties
            })
            .map(RawValue::get),
            kind: kind.as_str(),
        };
        let trigger = if resolved.created || resolved.absorbed.is_some() {
            Trigger::All(Some(message))
        } else {
            Trigger::Message {
                event,
                identify: kind == MessageType::Identify,
                message,
            }
        };
        let held = self.held(resolved.id)?;
        let mut dropped = held.profile_mut().apply(&observed, &set.retention, now_ms);
        dropped.add(resolved.dropped);
        if dropped != Dropped::default() {
            count_drops(&metrics, dropped);
        }
        let cause = Some((Cause::Message, entry.received_at_micros));
        self.evaluate(set, resolved.id, trigger, cause)
    }

    /// A change the stage emitted before a crash, read back by the redo: the log says what was
    /// sent on. A redo evaluates as the first run did, but with the segments in force when it
    /// runs and backfills in its own order, so it can fall behind what the log holds: then the
    /// membership takes the change, and the segment is evaluated again, so that what is sent on
    /// next follows on from what was sent (and no change number is used twice).
    pub(super) fn reconcile(&mut self, set: &SegmentSet, entry: &Entry) -> Result<(), StageError> {
        let Some((key, id, changes, entered)) = emit::parse_change_id(entry.message_id) else {
            return Ok(());
        };
        let stage = &mut self.stage;
        let held = match stage.cache.get(id) {
            Some(held) => held.profile.memberships.get(key).map(|m| m.changes),
            None if stage.deleted.contains(&id) => return Ok(()),
            None => match stage.read.profile(id)? {
                Some(p) => p.memberships.get(key).map(|m| m.changes),
                // Merged away since.
                None => return Ok(()),
            },
        };
        if held.unwrap_or(0) >= changes {
            return Ok(());
        }
        let since = stage.time;
        let profile = self.held(id)?;
        profile.memberships_changed = true;
        let m = profile.profile_mut().memberships.entry(key);
        (m.changes, m.member, m.since) = (changes, entered, since);
        if let Some(place) = set.position(key) {
            let only = HashSet::from([place]);
            self.evaluate(set, id, Trigger::Only(&only), None)?;
        }
        Ok(())
    }

    /// Evaluates the segments `trigger` calls for on the profile, at the stage's time; notes the
    /// changes to emit and the profile's next timer.
    pub(super) fn evaluate(
        &mut self,
        set: &SegmentSet,
        id: u64,
        trigger: Trigger,
        cause: Option<(Cause, i64)>,
    ) -> Result<(), StageError> {
        let (now, now_ms) = (self.stage.now(), self.stage.time);
        let metrics = self.stage.metrics.clone();
        let held = self.held(id)?;
        let evaluation = set.evaluate(held.profile_mut(), trigger, now_ms);
        held.memberships_changed |= !evaluation.transitions.is_empty();
        let (before, timer) = (held.timer, held.profile.next_recheck());
        if timer != before {
            held.timer = timer;
            if let Some(due) = timer {
                self.stage.timers.arm(due, id);
            }
        }
        metrics
            .evaluations
            .inc_by((evaluation.transitions.len() + evaluation.failures.len()) as u64);
        for (i, failure) in &evaluation.failures {
            let class = match failure {
                RuleFailure::Budget => FailureClass::Budget,
                RuleFailure::Error => FailureClass::Error,
            };
            metrics
                .rule_failures
                .get_or_create(&RuleFailureLabels {
                    segment: set.segments[*i].key.clone(),
                    class,
                })
                .inc();
        }
        let held = self.stage.cache.get(id).expect("loaded above");
        let profile = &held.profile;
        let mut out = Vec::new();
        let mut changed = Vec::new();
        for t in &evaluation.transitions {
            let segment = &set.segments[t.segment];
            out.extend(emit::change(
                segment, profile, t.entered, t.changes, now, cause,
            ));
            metrics
                .changes
                .get_or_create(&SegmentChangeLabels {
                    segment: segment.key.clone(),
                    direction: if t.entered {
                        Direction::Entered
                    } else {
                        Direction::Exited
                    },
                })
                .inc();
            changed.push(segment.key.clone());
        }
        for key in changed {
            self.stage.writes.last_change.insert(key, now_ms);
        }
        self.stage.emissions.extend(out);
        Ok(())
    }

    /// The profile, loaded into the cache if needed.
    pub(super) fn held(&mut self, id: u64) -> Result<&mut Held, StageError> {
        Directory::profile(self, id)?;
        Ok(self
            .stage
            .cache
            .get_mut(id)
            .expect("loaded by Directory::profile"))
    }
}
