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
