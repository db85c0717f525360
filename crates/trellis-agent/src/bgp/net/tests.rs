//! The transport's queues are bounded, on loopback sockets with small kernel buffers.

use std::io::Write as _;
use std::time::Instant;

use super::*;

/// A connected pair on loopback with small kernel buffers: (ours, the peer's std socket).
async fn pair() -> (TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.set_send_buffer_size(4096).unwrap();
    let ours = s.connect(at).await.unwrap();
    let (theirs, _) = l.accept().unwrap();
    theirs.set_nonblocking(true).unwrap();
    (ours, theirs)
}

#[tokio::test]
async fn the_reader_stops_reading_while_the_speaker_is_behind() {
    let (ours, mut theirs) = pair().await;
    let (events, _held) = mpsc::channel::<((), Read)>(4);
    let _writer = spawn_io(ours, false, (), events);
    // Nobody takes the decoded messages: after the queue's four, the reader stops reading and
    // the peer's writes block (TCP flow control) long before 4 MB of KEEPALIVEs.
    let keepalive = Message::Keepalive.encode(Context {
        four_octet_as: true,
        ibgp: false,
    });
    let chunk: Vec<u8> = keepalive.iter().copied().cycle().take(19 * 1000).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut written = 0usize;
    loop {
        assert!(
            written < 4 << 20,
            "the reader kept reading: {written} bytes taken"
        );
        assert!(Instant::now() < deadline, "the peer's writes never blocked");
        match theirs.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Give the reader the chance to drain more, if it (wrongly) would.
                tokio::time::sleep(Duration::from_millis(100)).await;
                match theirs.write(&chunk) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Ok(n) => written += n,
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn the_writer_queue_is_bounded_and_counts_its_bytes() {
    let (ours, _theirs) = pair().await; // the peer never reads
    let (events, _rx) = mpsc::channel::<((), Read)>(4);
    let w = spawn_io(ours, false, (), events);
    let chunk = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while w.send(chunk.clone()) {
        sent += 1;
        assert!(sent <= WRITE_QUEUE + 8, "the queue took {sent} chunks");
    }
    assert!(sent >= WRITE_QUEUE, "{sent}");
    // What the socket took is no longer queued; the rest is.
    let total = (sent * chunk.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.written() == 0 || w.queued() as u64 + w.written() != total {
        assert!(
            Instant::now() < deadline,
            "queued {} + written {} != {total}",
            w.queued(),
            w.written()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn keepalive() -> Vec<u8> {
    Message::Keepalive.encode(Context {
        four_octet_as: true,
        ibgp: false,
    })
}

/// Once the speaker dropped a connection, nothing more of it is forwarded — what the peer sends
/// after the drop must never reach a later session — and the reader ends, within the linger,
/// though the peer keeps its end open.
#[tokio::test]
async fn a_dropped_connection_forwards_nothing_more_and_its_reader_ends() {
    let (ours, mut theirs) = pair().await;
    let (events, mut rx) = mpsc::channel::<((), Read)>(4);
    let w = spawn_io(ours, false, (), events);
    theirs.write_all(&keepalive()).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(
        matches!(first, Ok(Some(((), Read::Message(Message::Keepalive))))),
        "{first:?}"
    );
    drop(w);
    theirs.write_all(&keepalive()).unwrap();
    // The only sender of `events` is the reader's: `None` means the reader ended.
    let end = tokio::time::timeout(CLOSE_LINGER + Duration::from_secs(5), rx.recv()).await;
    assert!(matches!(end, Ok(None)), "after the drop: {end:?}");
}

/// A peer that stops reading cannot hold the writer: once the speaker dropped the connection
/// (a send hold timer expiry, a full queue), the writer task gives up within the linger.
#[tokio::test]
async fn a_dropped_connection_to_a_peer_that_does_not_read_is_given_up() {
    let (ours, _theirs) = pair().await; // the peer never reads nor closes
    let (events, _rx) = mpsc::channel::<((), Read)>(4);
    let w = spawn_io(ours, false, (), events);
    let state = w.state.clone();
    while w.send(vec![0u8; 64 * 1024]) {}
    drop(w);
    let deadline = Instant::now() + CLOSE_LINGER + Duration::from_secs(5);
    while Arc::strong_count(&state) > 1 {
        assert!(Instant::now() < deadline, "the writer task still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects to `at` from a socket sending TTL `ttl` (loopback does not decrement it) and
/// returns the listener's side.
async fn accepted_with_ttl(l: &TcpListener, ttl: u32) -> (TcpStream, TcpStream) {
    let s = TcpSocket::new_v4().unwrap();
    setsockopt(&s, libc::IPPROTO_IP, libc::IP_TTL, &(ttl as libc::c_int)).unwrap();
    let at = l.local_addr().unwrap();
    let (ours, theirs) = tokio::join!(s.connect(at), l.accept());
    (theirs.unwrap().0, ours.unwrap())
}

#[tokio::test]
async fn a_gtsm_peer_s_connection_is_refused_unless_its_syn_had_ttl_255() {
    let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let gtsm = TtlPolicy {
        ttl: Some(255),
        min_ttl: Some(255),
    };
    let (low, _c1) = accepted_with_ttl(&l, 1).await;
    let e = accepted(&low, gtsm).expect_err("a SYN with TTL 1 must not pass GTSM");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("TTL 1"), "{e}");
    let (high, _c2) = accepted_with_ttl(&l, 255).await;
    accepted(&high, gtsm).expect("a SYN with TTL 255 passes");
    // Without GTSM any TTL is taken (a directly connected eBGP peer sends 1).
    let (plain, _c3) = accepted_with_ttl(&l, 1).await;
    accepted(&plain, TtlPolicy::default()).expect("no minimum, no check");
}

#[test]
fn the_ttl_is_read_from_either_family_s_header() {
    let mut v4 = vec![0u8; 40];
    v4[0] = 0x45;
    v4[8] = 7;
    assert_eq!(syn_ttl(&v4), Some(7));
    let mut v6 = vec![0u8; 60];
    v6[0] = 0x60;
    v6[7] = 255;
    assert_eq!(syn_ttl(&v6), Some(255));
    assert_eq!(syn_ttl(&[]), None);
    assert_eq!(syn_ttl(&[0x45, 0, 0]), None);
}
