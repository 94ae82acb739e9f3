//! Reads a JetStream stream back, for the tests that check what the event publisher put in it
//! (`tests/events_nats.rs` and `crates/nats/tests/nats.rs`, which include this file by path:
//! it needs `async-nats`, so `tests/common/mod.rs` does not declare it for every test).

#![allow(dead_code)]

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

/// One message of a stream.
#[derive(Clone, Debug)]
pub struct StreamMessage {
    pub stream_seq: u64,
    pub subject: String,
    /// The `Nats-Msg-Id` header ("" without one).
    pub msg_id: String,
    pub payload: serde_json::Value,
}

/// Every message of `stream` on the server at `url`, in stream order, or `None` when the
/// stream does not exist. `patience` bounds the wait for each message (against hangs).
pub fn read_stream(url: &str, stream: &str, patience: Duration) -> Option<Vec<StreamMessage>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap_or_else(|e| {
            panic!("no NATS server at {url} ({e}): run tools/nats/start.sh or tools/test.sh")
        });
        let mut s = jetstream::new(client).get_stream(stream).await.ok()?;
        let n = s.info().await.expect("stream info").state.messages;
        let c = s
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("an ephemeral consumer");
        let mut msgs = c.messages().await.expect("consumer messages");
        let mut out = Vec::new();
        while (out.len() as u64) < n {
            let m = tokio::time::timeout(patience, msgs.next())
                .await
                .expect("a stream message in time")
                .expect("a stream message")
                .expect("a readable stream message");
            let msg_id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            out.push(StreamMessage {
                stream_seq: m.info().expect("JetStream message info").stream_sequence,
                subject: m.subject.to_string(),
                msg_id,
                payload: serde_json::from_slice(&m.payload).expect("a JSON payload"),
            });
        }
        Some(out)
    })
}
