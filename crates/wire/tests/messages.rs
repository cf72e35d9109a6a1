//! Round-trip properties and byte snapshots of the wire format.

use hotpot_core::{Commitment, Credits, LayerSpan, ModelId, NodeId, NodeKey, Receipt, SessionId, Signature, StepRecord};
use hotpot_wire::{
    Accusation, ChainPayment, ClientMessage, ConvictionSignature, DType, Downstream, ErrorCode, EvidenceMessage, InfoRequest, NodeInfo, NodeMessage, Open,
    Priority, PushLinks, Step, Tensor, WalletProof, WireError,
};
use proptest::prelude::*;

fn span() -> impl Strategy<Value = LayerSpan> {
    (0u32..100, 1u32..100).prop_map(|(a, n)| LayerSpan::new(a, a + n).expect("non-empty"))
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (prop_oneof![Just(DType::F32), Just(DType::F16)], 1usize..4, 1usize..40)
        .prop_flat_map(|(dtype, rows, cols)| proptest::collection::vec(-1e4f32..1e4, rows * cols).prop_map(move |v| Tensor::from_f32(dtype, rows, cols, &v)))
}

fn session() -> impl Strategy<Value = SessionId> {
    any::<[u8; 16]>().prop_map(SessionId)
}

fn push_links() -> impl Strategy<Value = Option<PushLinks>> {
    let node = any::<[u8; 32]>().prop_map(NodeId::from_bytes);
    let downstream = (any::<[u8; 32]>(), session(), proptest::collection::vec("[a-z0-9/.]{0,30}", 0..3)).prop_map(|(n, session, addrs)| Downstream {
        node: NodeId::from_bytes(n),
        session,
        addrs,
    });
    proptest::option::of((proptest::option::of(node), proptest::option::of(downstream)).prop_map(|(upstream, downstream)| PushLinks { upstream, downstream }))
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (session(), any::<[u8; 32]>(), span(), any::<u32>(), any::<bool>(), push_links()).prop_map(|(session, m, span, max_len, batch, push)| {
            ClientMessage::Open(Open {
                session,
                model: ModelId::from_bytes(m),
                span,
                max_len,
                priority: if batch { Priority::Batch } else { Priority::Interactive },
                push,
            })
        }),
        (session(), any::<u32>(), tensor()).prop_map(|(session, pos, hidden)| ClientMessage::Step(Step { session, pos, hidden })),
        (session(), any::<u32>(), tensor()).prop_map(|(session, pos, hidden)| ClientMessage::PushStep(Step { session, pos, hidden })),
        (session(), any::<u32>()).prop_map(|(session, pos)| ClientMessage::Collect { session, pos }),
        (session(), any::<u32>()).prop_map(|(session, pos)| ClientMessage::Truncate { session, pos }),
        session().prop_map(|session| ClientMessage::Close { session }),
        (session(), span(), any::<u32>(), 0u64..10_000_000, any::<bool>(), any::<bool>()).prop_map(|(session, span, positions, price, signed, paid)| {
            let (gateway, node) = (NodeKey::from_secret_bytes(&[4; 32]).expect("key"), NodeKey::from_secret_bytes(&[5; 32]).expect("key"));
            let price = Credits::from_micros(price);
            let mut r =
                Receipt::sign(&gateway, session, ModelId::from_bytes([3; 32]), node.id(), span, u64::from(positions), price, [6; 32], 1_700_000_000_000);
            if signed {
                r.countersign(&node);
            }
            let payment = paid
                .then(|| Box::new(ChainPayment { chain_id: 31337, market: [7; 20], node: [8; 20], gateway: [9; 20], total: 1_234_567, signature: [10; 65] }));
            ClientMessage::Receipt(Box::new(r), payment)
        }),
        (any::<[u8; 32]>(), span(), tensor()).prop_map(|(m, span, inputs)| ClientMessage::Audit { model: ModelId::from_bytes(m), span, inputs }),
    ]
}

fn commitment(tensor: &Tensor, session: SessionId) -> Commitment {
    let key = NodeKey::from_secret_bytes(&[9; 32]).expect("key");
    Commitment::sign(
        &key,
        StepRecord {
            session,
            model: ModelId::from_bytes([3; 32]),
            span: LayerSpan::new(0, 10).expect("span"),
            start_pos: 2,
            rows: tensor.rows() as u32,
            input: tensor.bytes(),
            output: tensor.bytes(),
        },
        vec![vec![7; 10], vec![]],
    )
}

fn node_message() -> impl Strategy<Value = NodeMessage> {
    prop_oneof![
        (session(), any::<u32>()).prop_map(|(session, max_len)| NodeMessage::Opened { session, max_len }),
        (session(), tensor()).prop_map(|(session, hidden)| {
            let commitment = Box::new(commitment(&hidden, session));
            NodeMessage::Output { session, hidden, commitment }
        }),
        (session(), any::<u32>()).prop_map(|(session, len)| NodeMessage::Truncated { session, len }),
        (any::<u32>(), ".{0,50}").prop_map(|(retry_after_ms, message)| NodeMessage::Busy { retry_after_ms, message }),
        any::<[u8; 32]>().prop_map(|half| NodeMessage::Countersigned { signature: Signature([half, half].concat().try_into().expect("64 bytes")) }),
        (0usize..12, ".{0,50}").prop_map(|(i, message)| {
            let codes = [
                ErrorCode::BadRequest,
                ErrorCode::WrongModel,
                ErrorCode::SpanNotServed,
                ErrorCode::ShuttingDown,
                ErrorCode::UnknownSession,
                ErrorCode::NotYourSession,
                ErrorCode::BadPosition,
                ErrorCode::BadTensor,
                ErrorCode::ContextFull,
                ErrorCode::Internal,
                ErrorCode::ReceiptsOwed,
                ErrorCode::BadReceipt,
            ];
            NodeMessage::Error { code: codes[i], message }
        }),
        tensor().prop_map(|outputs| NodeMessage::Audited { outputs }),
    ]
}

fn node_info() -> impl Strategy<Value = NodeInfo> {
    (span(), 0u32..50, "[a-z0-9-]{0,20}", proptest::collection::vec("/ip4/127.0.0.1/udp/[0-9]{1,5}/quic-v1", 0..4), any::<u64>(), any::<bool>()).prop_map(
        |(span, extra, model_name, addrs, timestamp_ms, wallet)| NodeInfo {
            node: NodeKey::from_secret_bytes(&[1; 32]).expect("key").id(),
            model: ModelId::from_bytes([5; 32]),
            model_name,
            n_blocks: span.end() + extra,
            span,
            throughput: 123.5,
            free_slots: 3,
            max_sessions: 8,
            queue: 1,
            price_per_1k: 10,
            version: "0.1.0".into(),
            addrs,
            timestamp_ms,
            features: hotpot_wire::features::PUSH,
            wallet: wallet.then(|| WalletProof { address: [1; 20], node_signature: Signature([2; 64]), wallet_signature: [3; 65] }),
        },
    )
}

proptest! {
    #[test]
    fn client_messages_round_trip(m in client_message()) {
        prop_assert_eq!(ClientMessage::decode(&m.encode()).expect("decodes"), m);
    }

    #[test]
    fn node_messages_round_trip(m in node_message()) {
        prop_assert_eq!(NodeMessage::decode(&m.encode()).expect("decodes"), m);
    }

    #[test]
    fn node_info_round_trips(i in node_info()) {
        prop_assert_eq!(NodeInfo::decode(&i.encode()).expect("decodes"), i);
    }

    #[test]
    fn accusations_and_evidence_round_trip(node in any::<[u8; 32]>(), model in any::<[u8; 32]>(), span in span(), hash in any::<[u8; 32]>(),
                                           addrs in proptest::collection::vec("/ip4/127.0.0.1/udp/[0-9]{1,5}/quic-v1", 0..4),
                                           bytes in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200))) {
        let a = Accusation { node: hotpot_core::NodeId::from_bytes(node), model: ModelId::from_bytes(model), span, evidence: hash, addrs };
        prop_assert_eq!(Accusation::decode(&a.encode()).expect("decodes"), a);
        let c = ConvictionSignature { chain_id: 31337, market: [1; 20], node: [2; 20], model: ModelId::from_bytes(model), evidence: hash, auditor: [3; 20], signature: [4; 65] };
        let encoded = c.encode();
        prop_assert_eq!(ConvictionSignature::decode(&encoded).expect("decodes"), c);
        prop_assert!(ConvictionSignature::decode(&encoded[..encoded.len() - 1]).is_err());
        for m in [EvidenceMessage::Request { evidence: hash }, EvidenceMessage::Evidence { bytes }] {
            let encoded = m.encode();
            prop_assert_eq!(EvidenceMessage::decode(&encoded).expect("decodes"), m);
            prop_assert!(EvidenceMessage::decode(&encoded[..encoded.len() - 1]).is_err());
        }
    }

    #[test]
    fn truncated_messages_are_errors(m in client_message(), cut in 0usize..1000) {
        let bytes = m.encode();
        let cut = cut % bytes.len();
        match (ClientMessage::decode(&bytes[..cut]), &m) {
            (Err(_), _) => {}
            // Push links are an optional tail (so that nodes from before
            // push read pushed Opens' base): cut exactly there, the rest
            // is the same Open, unpushed.
            (Ok(ClientMessage::Open(short)), ClientMessage::Open(full)) if full.push.is_some() => {
                prop_assert_eq!(short, Open { push: None, ..full.clone() });
            }
            // The same for a receipt's chain payment.
            (Ok(ClientMessage::Receipt(short, None)), ClientMessage::Receipt(full, Some(_))) => prop_assert_eq!(&short, full),
            (Ok(other), _) => prop_assert!(false, "a cut message decoded as {other:?}"),
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = ClientMessage::decode(&bytes);
        let _ = NodeMessage::decode(&bytes);
        let _ = NodeInfo::decode(&bytes);
        let _ = InfoRequest::decode(&bytes);
        let _ = Accusation::decode(&bytes);
        let _ = EvidenceMessage::decode(&bytes);
        let _ = ConvictionSignature::decode(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(m in node_message(), at in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = m.encode();
        let at = at % bytes.len();
        bytes[at] = byte;
        let _ = NodeMessage::decode(&bytes);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The exact bytes of a few messages: changing them breaks every deployed
/// node, so it must be a deliberate version bump.
#[test]
fn byte_snapshots() {
    let session = SessionId([0xAB; 16]);
    let open = ClientMessage::Open(Open {
        session,
        model: ModelId::from_bytes([0x11; 32]),
        span: LayerSpan::new(10, 20).expect("span"),
        max_len: 2048,
        priority: Priority::Batch,
        push: None,
    });
    assert_eq!(hex(&open.encode()), format!("0201{}{}0a00000014000000{}01", "ab".repeat(16), "11".repeat(32), "00080000"));
    let step = ClientMessage::Step(Step { session, pos: 7, hidden: Tensor::from_f32(DType::F32, 1, 2, &[1.0, -2.0]) });
    assert_eq!(hex(&step.encode()), format!("0202{}07000000000100000002000000080000000000803f000000c0", "ab".repeat(16)));
    let error = NodeMessage::Error { code: ErrorCode::BadTensor, message: "bad".into() };
    assert_eq!(hex(&error.encode()), "02130703000000626164");
    let busy = NodeMessage::busy(std::time::Duration::from_millis(250), "full");
    assert_eq!(hex(&busy.encode()), "0215fa0000000400000066756c6c");
    assert_eq!(hex(&InfoRequest.encode()), "0220");
    let collect = ClientMessage::Collect { session, pos: 9 };
    assert_eq!(hex(&collect.encode()), format!("0207{}09000000", "ab".repeat(16)));
    // Push links ride after an Open's base fields: 1 = present.
    let pushed = ClientMessage::Open(Open {
        session,
        model: ModelId::from_bytes([0x11; 32]),
        span: LayerSpan::new(10, 20).expect("span"),
        max_len: 2048,
        priority: Priority::Batch,
        push: Some(PushLinks { upstream: Some(NodeId::from_bytes([0x22; 32])), downstream: None }),
    });
    assert_eq!(hex(&pushed.encode()), format!("{}01{}00", hex(&open.encode()), "22".repeat(32)));
}

#[test]
fn bad_headers_and_shapes_are_refused() {
    let close = ClientMessage::Close { session: SessionId([1; 16]) }.encode();
    let mut future = close.clone();
    future[0] = 3;
    assert!(matches!(ClientMessage::decode(&future), Err(WireError::Version(3))));
    let mut unknown = close.clone();
    unknown[1] = 99;
    assert!(matches!(ClientMessage::decode(&unknown), Err(WireError::Tag(99))));
    let mut trailing = close;
    trailing.push(0);
    assert!(matches!(ClientMessage::decode(&trailing), Err(WireError::Trailing(1))));

    // A tensor claiming more bytes than its shape, or a huge shape.
    let step = ClientMessage::Step(Step { session: SessionId([1; 16]), pos: 0, hidden: Tensor::from_f32(DType::F32, 1, 2, &[1.0, 2.0]) });
    let mut bytes = step.encode();
    let rows_at = 2 + 16 + 4 + 1;
    bytes[rows_at..rows_at + 4].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(ClientMessage::decode(&bytes), Err(WireError::Invalid(_))));
    bytes[rows_at..rows_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    bytes[rows_at + 4..rows_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(ClientMessage::decode(&bytes).is_err());
}
