//! The publisher's loop. One event at a time, in order: read the next events after the
//! cursor, publish one, wait for its acknowledgement (a JetStream PubAck, or a flush without
//! JetStream), advance the cursor, and after each batch write the cursor to its file. A failure
//! is never skipped past: the event is retried after a pause that doubles up to
//! `max_backoff`, with a warning that names the server URL. With JetStream, the first publish
//! after a (re)start or a failure is preceded by a look at the stream's newest messages: if
//! the stream already holds this store's events past the cursor (the acknowledgement was lost,
//! or the process stopped before writing the cursor), the cursor jumps to the newest of them
//! instead of sending them again. `Nats-Msg-Id` makes JetStream drop any copy that still
//! arrives twice within its duplicate window.

use std::sync::Arc;
use std::time::Duration;

use artifactfs_core::index::EventRow;
use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use tokio::sync::watch;

use crate::{EventFn, NatsOptions, Shared, cursor, subject};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);

pub(crate) struct Worker {
    pub opts: NatsOptions,
    pub addrs: Vec<async_nats::ServerAddr>,
    pub store_id: String,
    pub events: Arc<EventFn>,
    pub cursor_path: std::path::PathBuf,
    /// Last acknowledged sequence number.
    pub acked: i64,
    /// What the cursor file holds.
    pub saved: i64,
    pub shared: Arc<Shared>,
    pub stop: watch::Receiver<bool>,
}

/// A connection and what is known about it.
struct Session {
    client: async_nats::Client,
    js: Option<jetstream::Context>,
    /// The stream, once it is known to exist on this connection.
    stream: Option<stream::Stream>,
    /// Whether the stream may hold events past the cursor (after a start or a failure).
    in_doubt: bool,
}

struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = FIRST_BACKOFF.min(self.max);
    }
}

/// Why a step did not finish.
enum Stop {
    Requested,
    Failed(String),
}

impl Worker {
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff {
            next: FIRST_BACKOFF.min(self.opts.max_backoff),
            max: self.opts.max_backoff,
        };
        let mut session: Option<Session> = None;
        loop {
            if self.stopped() {
                break;
            }
            let step = match session.as_mut() {
                None => match self.connect().await {
                    Ok(s) => {
                        session = Some(s);
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some(s) => self.step(s).await,
            };
            match step {
                Ok(()) => backoff.reset(),
                Err(Stop::Requested) => break,
                Err(Stop::Failed(msg)) => {
                    self.save_cursor().await;
                    let wait = backoff.take();
                    tracing::warn!(
                        url = %self.opts.url, retry_in = ?wait, acked = self.acked,
                        "event publishing: {msg}"
                    );
                    {
                        let mut st = self.shared.status();
                        st.connected = false;
                        st.last_error = Some(msg);
                    }
                    if let Some(s) = session.as_mut() {
                        s.in_doubt = true;
                        s.stream = None;
                    }
                    if self.pause(wait).await {
                        break;
                    }
                }
            }
        }
        self.save_cursor().await;
        if let Some(s) = session {
            let _ = tokio::time::timeout(self.opts.timeout, s.client.flush()).await;
        }
        tracing::info!(acked = self.acked, "event publisher stopped");
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`; true if a stop was requested meanwhile.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopped(),
            _ = self.stop.changed() => true,
        }
    }

    async fn connect(&mut self) -> Result<Session, Stop> {
        let url = self.opts.url.clone();
        let max = self.opts.max_backoff;
        let events_url = url.clone();
        let connect = async_nats::ConnectOptions::new()
            .name("artifactfs-events")
            .connection_timeout(self.opts.timeout)
            .reconnect_delay_callback(move |n| {
                FIRST_BACKOFF.saturating_mul(1 << n.min(16) as u32).min(max)
            })
            .event_callback(move |ev| {
                let url = events_url.clone();
                async move {
                    match ev {
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%url, "disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::Connected => {
                            tracing::info!(%url, "reconnected to NATS")
                        }
                        other => tracing::debug!(%url, event = %other, "NATS client event"),
                    }
                }
            })
            .connect(self.addrs.clone());
        let client = tokio::select! {
            r = tokio::time::timeout(self.opts.timeout, connect) => match r {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(Stop::Failed(format!("cannot connect to NATS at {url}: {e}"))),
                Err(_) => return Err(Stop::Failed(format!(
                    "cannot connect to NATS at {url}: no answer within {:?}", self.opts.timeout
                ))),
            },
            _ = self.stop.changed() => return Err(Stop::Requested),
        };
        tracing::info!(%url, "connected to NATS");
        let js = self.opts.jetstream.then(|| {
            let mut js = jetstream::new(client.clone());
            js.set_timeout(self.opts.timeout);
            js
        });
        Ok(Session {
            client,
            js,
            stream: None,
            in_doubt: true,
        })
    }

    /// One round: make sure of the stream, settle doubts, publish what the log has after the
    /// cursor (or wait for a nudge if nothing).
    async fn step(&mut self, s: &mut Session) -> Result<(), Stop> {
        if s.client.connection_state() != State::Connected {
            return Err(Stop::Failed(format!(
                "not connected to NATS at {} (the client is reconnecting)",
                self.opts.url
            )));
        }
        if let Some(js) = &s.js
            && s.stream.is_none()
        {
            s.stream = Some(self.ensure_stream(js).await?);
        }
        if s.in_doubt {
            self.check_cursor_in_log().await?;
            if let Some(stream) = &s.stream {
                self.reconcile(stream).await?;
            }
            s.in_doubt = false;
        }
        {
            let mut st = self.shared.status();
            st.connected = true;
        }
        let batch = self.read_events().await?;
        if batch.is_empty() {
            self.save_cursor().await;
            tokio::select! {
                _ = self.shared.nudge.notified() => {}
                _ = tokio::time::sleep(self.opts.poll_interval) => {}
                _ = self.stop.changed() => return Err(Stop::Requested),
            }
            return Ok(());
        }
        let mut stop = self.stop.clone();
        for ev in &batch {
            let duplicate = tokio::select! {
                r = self.publish(s, ev) => r?,
                _ = stop.changed() => return Err(Stop::Requested),
            };
            self.acked = ev.seq;
            let mut st = self.shared.status();
            st.acked = ev.seq;
            st.published += 1;
            st.duplicates += u64::from(duplicate);
            st.last_error = None;
        }
        self.save_cursor().await;
        Ok(())
    }

    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<stream::Stream, Stop> {
        let cfg = stream::Config {
            name: self.opts.stream.clone(),
            subjects: vec![format!("{}.>", self.opts.subject_prefix)],
            duplicate_window: self.opts.duplicate_window,
            ..Default::default()
        };
        let stream = js.get_or_create_stream(cfg).await.map_err(|e| {
            Stop::Failed(format!(
                "JetStream stream {} on {}: {e}",
                self.opts.stream, self.opts.url
            ))
        })?;
        Ok(stream)
    }

    /// Moves the cursor past the events of this store that the stream already holds.
    async fn reconcile(&mut self, stream: &stream::Stream) -> Result<(), Stop> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Stop::Failed(format!(
                "JetStream stream {} on {}: {what}: {e}",
                self.opts.stream, self.opts.url
            ))
        };
        let info = stream.get_info().await.map_err(|e| fail("info", &e))?;
        let prefix = format!("{}-", self.store_id);
        let (first, mut seq) = (info.state.first_sequence, info.state.last_sequence);
        let mut found = None;
        let mut scanned = 0;
        while seq >= first.max(1) && scanned < self.opts.reconcile_scan {
            match stream.get_raw_message(seq).await {
                Ok(m) => {
                    let id = m.headers.get(async_nats::header::NATS_MESSAGE_ID);
                    if let Some(n) = id
                        .and_then(|v| v.as_str().strip_prefix(&prefix))
                        .and_then(|n| n.parse::<i64>().ok())
                    {
                        found = Some(n);
                        if n > self.acked {
                            self.check_same_event(n, &m.payload).await?;
                        }
                        break;
                    }
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(fail(&format!("read message {seq}"), &e)),
            }
            seq -= 1;
            scanned += 1;
        }
        match found {
            Some(n) if n > self.acked => {
                tracing::info!(
                    stream = %self.opts.stream, cursor = self.acked, in_stream = n,
                    "the stream already holds events past the cursor; resuming after them"
                );
                self.acked = n;
                self.shared.status().acked = n;
                self.save_cursor().await;
            }
            Some(n) if n < self.acked => tracing::warn!(
                stream = %self.opts.stream, cursor = self.acked, in_stream = n,
                "the stream lacks acknowledged events (purged or recreated?); they are not \
                 sent again unless the cursor file is lowered"
            ),
            _ => {}
        }
        Ok(())
    }

    /// The log's event `seq`, if it has one.
    async fn event_at(&self, seq: i64) -> Result<Option<EventRow>, Stop> {
        let f = self.events.clone();
        match tokio::task::spawn_blocking(move || f(seq - 1, 1)).await {
            Ok(Ok(v)) => Ok(v.into_iter().next().filter(|e| e.seq == seq)),
            Ok(Err(e)) => Err(Stop::Failed(format!("read the event log: {e}"))),
            Err(e) => Err(Stop::Failed(format!("read the event log: {e}"))),
        }
    }

    /// Refuses to go on when the cursor is past the end of the log: the log was renumbered
    /// (an index rebuilt where it could not see the old log or the cursor), and waiting for
    /// the log to grow past the cursor would skip every event up to it.
    async fn check_cursor_in_log(&self) -> Result<(), Stop> {
        if self.acked <= 0 {
            return Ok(());
        }
        let f = self.events.clone();
        let after = self.acked - 1;
        let reaches = match tokio::task::spawn_blocking(move || f(after, 1)).await {
            Ok(Ok(v)) => !v.is_empty(),
            Ok(Err(e)) => return Err(Stop::Failed(format!("read the event log: {e}"))),
            Err(e) => return Err(Stop::Failed(format!("read the event log: {e}"))),
        };
        if reaches {
            return Ok(());
        }
        Err(Stop::Failed(format!(
            "the cursor {} ({}) is past the end of the store's event log: the log was \
             renumbered; nothing is published so that no event is skipped. Run `index \
             rebuild` again with the cursor file in place (the new log is numbered after it), \
             or lower the cursor",
            self.cursor_path.display(),
            self.acked
        )))
    }

    /// Before the cursor jumps to `n`, the newest of this store's events in the stream: the
    /// log's event `n` must be the one the stream holds (same kind and time). If it is not,
    /// the log was renumbered under the same store id and jumping would lose events.
    async fn check_same_event(&self, n: i64, payload: &[u8]) -> Result<(), Stop> {
        let in_stream: Option<(String, i64)> = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| Some((v["kind"].as_str()?.to_owned(), v["at_ns"].as_i64()?)));
        let in_log = self.event_at(n).await?.map(|e| (e.kind, e.at_ns));
        if in_stream.is_some() && in_stream == in_log {
            return Ok(());
        }
        Err(Stop::Failed(format!(
            "the stream {} holds event {n} of store {} (cursor {}), but the store's event log \
             has {} at that number: the log was renumbered (an index rebuilt without its old \
             index and without the cursor file); nothing is published so that no event is \
             dropped as a duplicate. Write {n} to {} and run `index rebuild` again (the new \
             log is numbered after it)",
            self.opts.stream,
            self.store_id,
            self.acked,
            in_log.map_or("no event".to_owned(), |(k, _)| format!(
                "another event ({k})"
            )),
            self.cursor_path.display()
        )))
    }

    async fn read_events(&self) -> Result<Vec<EventRow>, Stop> {
        let f = self.events.clone();
        let (after, limit) = (self.acked, self.opts.batch);
        match tokio::task::spawn_blocking(move || f(after, limit)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Stop::Failed(format!("read the event log: {e}"))),
            Err(e) => Err(Stop::Failed(format!("read the event log: {e}"))),
        }
    }

    /// Publishes one event and waits until it counts as delivered; returns whether JetStream
    /// called it a duplicate.
    async fn publish(&self, s: &Session, ev: &EventRow) -> Result<bool, Stop> {
        let url = &self.opts.url;
        let subj = subject::subject(&self.opts.subject_prefix, ev);
        let id = subject::msg_id(&self.store_id, ev.seq);
        let mut body = serde_json::to_vec(&subject::payload(&self.store_id, ev))
            .map_err(|e| Stop::Failed(format!("encode event {}: {e}", ev.seq)))?;
        // Headroom for the subject and headers.
        let max_payload = s.client.server_info().max_payload;
        let max = max_payload.saturating_sub(1024);
        if max_payload > 0 && body.len() > max {
            tracing::warn!(
                seq = ev.seq,
                bytes = body.len(),
                max,
                "event larger than the server's max_payload: published without its detail"
            );
            let mut p = subject::payload(&self.store_id, ev);
            p["detail"] = serde_json::Value::Null;
            p["detail_truncated"] = serde_json::Value::Bool(true);
            body = serde_json::to_vec(&p)
                .map_err(|e| Stop::Failed(format!("encode event {}: {e}", ev.seq)))?;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        match &s.js {
            Some(js) => {
                let ack = js
                    .publish_with_headers(subj.clone(), headers, body.into())
                    .await
                    .map_err(|e| {
                        Stop::Failed(format!("publish event {} to {subj} on {url}: {e}", ev.seq))
                    })?
                    .await
                    .map_err(|e| {
                        let hint = if e.kind() == PublishErrorKind::StreamNotFound {
                            " (does the stream cover this subject?)"
                        } else {
                            ""
                        };
                        Stop::Failed(format!(
                            "no acknowledgement for event {} on {subj} from {url}: {e}{hint}",
                            ev.seq
                        ))
                    })?;
                if ack.stream != self.opts.stream {
                    return Err(Stop::Failed(format!(
                        "event {} on {subj} was stored by stream {} on {url}, not {}",
                        ev.seq, ack.stream, self.opts.stream
                    )));
                }
                tracing::debug!(seq = ev.seq, subject = %subj, stream_seq = ack.sequence, duplicate = ack.duplicate, "published");
                Ok(ack.duplicate)
            }
            None => {
                s.client
                    .publish_with_headers(subj.clone(), headers, body.into())
                    .await
                    .map_err(|e| {
                        Stop::Failed(format!("publish event {} to {subj} on {url}: {e}", ev.seq))
                    })?;
                match tokio::time::timeout(self.opts.timeout, s.client.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(Stop::Failed(format!(
                            "flush event {} to {url}: {e}",
                            ev.seq
                        )));
                    }
                    Err(_) => {
                        return Err(Stop::Failed(format!(
                            "flush event {} to {url}: no answer within {:?}",
                            ev.seq, self.opts.timeout
                        )));
                    }
                }
                tracing::debug!(seq = ev.seq, subject = %subj, "published");
                Ok(false)
            }
        }
    }

    /// Writes the cursor if it moved. A failure is logged and retried at the next save: the
    /// events stay acknowledged in memory, and at worst a restart sends them again.
    async fn save_cursor(&mut self) {
        if self.acked == self.saved {
            return;
        }
        let (path, seq) = (self.cursor_path.clone(), self.acked);
        match tokio::task::spawn_blocking(move || cursor::write(&path, seq)).await {
            Ok(Ok(())) => self.saved = seq,
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record the NATS cursor"),
            Err(e) => tracing::error!(error = %e, "cannot record the NATS cursor"),
        }
    }
}
