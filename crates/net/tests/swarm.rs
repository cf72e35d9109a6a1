//! Real swarms on 127.0.0.1: joining, provider records, gossip, streams.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use hotpot_net::{NetEvent, Network, NetworkConfig, NodeKey, node_id_of};

fn config(join: Vec<hotpot_net::Multiaddr>, listen: bool) -> NetworkConfig {
    NetworkConfig {
        key: NodeKey::generate(),
        listen: if listen { vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")] } else { vec![] },
        join,
        dht_server: listen,
        mdns: false,
        relay: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_find_providers_gossip_and_talk() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let a = Network::start(config(vec![], true)).await.expect("a starts");
        let a_addr = a.listen_addrs().await.expect("addrs")[0].clone();
        let b = Network::start(config(vec![a_addr.clone()], true)).await.expect("b starts");
        assert_eq!(node_id_of(&b.peer_id()), Some(b.node_id()));

        // b provides a key; a client that only knows a finds b through the DHT.
        b.provide(vec!["hotpot/test/block/3".into()]).await.expect("provides");
        let client = Network::start(config(vec![a_addr], false)).await.expect("client starts");
        client.bootstrap().await.expect("bootstraps");
        let mut found = Default::default();
        for _ in 0..40 {
            found = client.providers("hotpot/test/block/3".into(), Duration::from_secs(5)).await.expect("query");
            if found.contains(&b.peer_id()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(found.contains(&b.peer_id()), "providers: {found:?}");

        // Streams: b echoes one message back.
        let mut incoming = b.accept("/hotpot/echo/1").expect("accepts");
        tokio::spawn(async move {
            while let Some((_, mut stream)) = incoming.next().await {
                let mut buf = [0u8; 5];
                stream.read_exact(&mut buf).await.expect("reads");
                stream.write_all(&buf).await.expect("writes");
                stream.close().await.expect("closes");
            }
        });
        let mut stream = client.open_stream(b.peer_id(), "/hotpot/echo/1", Duration::from_secs(10)).await.expect("opens");
        stream.write_all(b"hello").await.expect("writes");
        let mut back = [0u8; 5];
        stream.read_exact(&mut back).await.expect("reads");
        assert_eq!(&back, b"hello");

        // Gossip: b publishes, the client (subscribed) hears it.
        let mut events = client.events();
        client.subscribe("hotpot/test".into()).await.expect("subscribes");
        b.subscribe("hotpot/test".into()).await.expect("subscribes");
        let heard = async {
            loop {
                b.publish("hotpot/test".into(), b"beat".to_vec()).await.expect("publishes");
                let deadline = tokio::time::sleep(Duration::from_millis(500));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        event = events.recv() => {
                            if let Ok(NetEvent::Gossip { data, source, .. }) = event
                                && data == b"beat"
                                && source == Some(b.peer_id())
                            {
                                return;
                            }
                        }
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), heard).await.expect("gossip arrives");
        for n in [a, b, client] {
            n.shutdown().await;
        }
    })
    .await
    .expect("finishes in time");
}
