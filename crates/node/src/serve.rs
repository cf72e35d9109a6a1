//! The node's side of `/hotpot/infer/1` and `/hotpot/info/1`.
//!
//! Each session is one stream. Anything malformed on a stream gets an
//! error answer and closes that stream only; other sessions carry on.

use std::time::Duration;

use hotpot_core::SessionId;
use hotpot_net::{Framed, PeerId, Stream};
use hotpot_wire::{ClientMessage, ErrorCode, InfoRequest, NodeInfo, NodeMessage};

use crate::worker::{Job, Jobs};

/// Limits of one session stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    /// How long a stream may stay silent before the node closes it.
    pub idle: Duration,
    /// Deadline for writing one answer.
    pub write: Duration,
}

pub(crate) async fn serve_session(peer: PeerId, stream: Stream, jobs: Jobs, limits: StreamLimits) {
    let mut framed = Framed::new(peer, stream);
    let mut session: Option<SessionId> = None;
    loop {
        let frame = match framed.recv(limits.idle).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "session stream ends");
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(), limits.write).await;
                break;
            }
        };
        let message = match ClientMessage::decode(&frame) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "malformed message");
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(), limits.write).await;
                break;
            }
        };
        let (answer, fatal) = handle(peer, message, &mut session, &jobs).await;
        let Some(answer) = answer else { break };
        if framed.send(&answer.encode(), limits.write).await.is_err() || fatal {
            break;
        }
    }
    if let Some(session) = session {
        jobs.tell(Job::Close { owner: peer, session }).await;
    }
    framed.close().await;
}

/// Answers one message; `None` ends the stream (after `Close`), `fatal`
/// ends it after the answer.
async fn handle(peer: PeerId, message: ClientMessage, session: &mut Option<SessionId>, jobs: &Jobs) -> (Option<NodeMessage>, bool) {
    let mine = |id: SessionId, session: &Option<SessionId>| session.is_some_and(|s| s == id);
    match message {
        ClientMessage::Open(open) => {
            if session.is_some() {
                return (Some(NodeMessage::error(ErrorCode::BadRequest, "this stream already carries a session")), true);
            }
            let id = open.session;
            let answer = jobs.ask(|reply| Job::Open { owner: peer, open, reply }).await;
            if matches!(answer, NodeMessage::Opened { .. }) {
                *session = Some(id);
            }
            (Some(answer), false)
        }
        ClientMessage::Step(step) => {
            if !mine(step.session, session) {
                return (Some(NodeMessage::error(ErrorCode::NotYourSession, "this stream carries another session")), false);
            }
            (Some(jobs.ask(|reply| Job::Step { owner: peer, step, reply }).await), false)
        }
        ClientMessage::Truncate { session: id, pos } => {
            if !mine(id, session) {
                return (Some(NodeMessage::error(ErrorCode::NotYourSession, "this stream carries another session")), false);
            }
            (Some(jobs.ask(|reply| Job::Truncate { owner: peer, session: id, pos, reply }).await), false)
        }
        ClientMessage::Close { session: id } => {
            if mine(id, session) {
                jobs.tell(Job::Close { owner: peer, session: id }).await;
                *session = None;
            }
            (None, true)
        }
        ClientMessage::Audit { .. } => (Some(NodeMessage::error(ErrorCode::BadRequest, "audits go over /hotpot/audit/1")), true),
    }
}

/// One audit per stream: recompute a span over the given inputs.
pub(crate) async fn serve_audit(peer: PeerId, stream: Stream, jobs: Jobs, model: hotpot_core::ModelId, dim: usize, limits: StreamLimits) {
    let mut framed = Framed::new(peer, stream);
    if let Ok(Some(frame)) = framed.recv(limits.idle).await {
        let answer = match ClientMessage::decode(&frame) {
            Ok(ClientMessage::Audit { model: m, .. }) if m != model => NodeMessage::error(ErrorCode::WrongModel, "this node serves another model"),
            Ok(ClientMessage::Audit { inputs, .. }) if inputs.cols() != dim => NodeMessage::error(ErrorCode::BadTensor, format!("inputs must be {dim} wide")),
            Ok(ClientMessage::Audit { span, inputs, .. }) => match hotpot_engine::HiddenStates::new(inputs.rows(), dim, inputs.to_f32()) {
                Ok(inputs) => jobs.ask(|reply| Job::Audit { span, inputs, reply }).await,
                Err(e) => NodeMessage::error(ErrorCode::BadTensor, e.to_string()),
            },
            Ok(_) => NodeMessage::error(ErrorCode::BadRequest, "expected an Audit request"),
            Err(e) => NodeMessage::error(ErrorCode::BadRequest, e.to_string()),
        };
        let _ = framed.send(&answer.encode(), limits.write).await;
    }
    framed.close().await;
}

pub(crate) async fn serve_info(peer: PeerId, stream: Stream, info: NodeInfo) {
    let mut framed = Framed::new(peer, stream);
    let timeout = Duration::from_secs(10);
    if let Ok(Some(frame)) = framed.recv(timeout).await {
        let answer = match InfoRequest::decode(&frame) {
            Ok(InfoRequest) => info.encode(),
            Err(e) => NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(),
        };
        let _ = framed.send(&answer, timeout).await;
    }
    framed.close().await;
}
