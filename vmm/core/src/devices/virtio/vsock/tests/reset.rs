//! Resets: the guest's (device reset), and the transport reset a restored device sends, with
//! what waits for the guest to take it in.

use super::*;

#[test]
fn transport_reset_closes_everything() {
    let mut g = Guest::new();
    g.give_rx(8, 4096);
    let listener = UnixListener::bind(g.host_path(52)).unwrap();
    let mut host = guest_connect(&mut g, &listener, 1000, 52);
    g.dev.send_transport_reset();
    assert_eq!(g.dev.connection_count(), 0);
    let mut b = [0u8; 1];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut b).unwrap(), 0);
    // No event buffer yet: delivered once the guest gives one.
    assert!(g.ev.used(&g.mem).is_empty());
    g.mem.write_obj(0xffff_ffffu32, GuestAddress(EV_BUFS)).unwrap();
    g.ev.push(&g.mem.clone(), 0, &[(EV_BUFS, 4, true)]);
    g.dev.process_queue(EVQ);
    assert_eq!(g.ev.used(&g.mem), [(0, 4)]);
    assert_eq!(g.mem.read_obj::<u32>(GuestAddress(EV_BUFS)).unwrap(), EVENT_TRANSPORT_RESET);
    assert!(g.irq.read().is_ok());
    // Packets for the old connection are reset.
    g.send(Hdr::guest(1000, 52, OP_RW), b"x");
    assert_eq!(ops(&g.recv_refill(4096)), [OP_RST]);
}

#[test]
fn host_connections_wait_until_the_guest_has_taken_in_a_reset() {
    let mut g = Guest::new();
    g.give_rx(8, 4096);
    g.ev.push(&g.mem.clone(), 0, &[(EV_BUFS, 4, true)]);
    g.dev.send_transport_reset();
    assert_eq!(g.ev.used(&g.mem), [(0, 4)], "the reset went out");
    let mut cl = client(&g);
    cl.write_all(b"CONNECT 1024\n").unwrap();
    g.host();
    assert!(g.recv().is_empty(), "no request while the guest still handles its reset");
    // Linux reads its CID back first thing when it handles the event.
    let mut cid = [0u8; 8];
    g.dev.read_config(0, &mut cid);
    g.host();
    assert_eq!(ops(&g.recv_refill(4096)), [OP_REQUEST]);

    // A guest that never reads its CID gets the request after a while all the same.
    g.ev.push(&g.mem.clone(), 1, &[(EV_BUFS, 4, true)]);
    g.dev.send_transport_reset();
    let mut cl2 = client(&g);
    cl2.write_all(b"CONNECT 1024\n").unwrap();
    g.host();
    assert!(g.recv().is_empty());
    std::thread::sleep(RESET_ACK_TIMEOUT);
    g.host();
    assert_eq!(ops(&g.recv_refill(4096)), [OP_REQUEST]);
    drop((cl, cl2));
}

#[test]
fn a_device_restored_on_the_saved_queues_resets_the_guests_connections() {
    let mut g = Guest::new();
    g.give_rx(8, 4096);
    let listener = UnixListener::bind(g.host_path(52)).unwrap();
    let _host = guest_connect(&mut g, &listener, 1000, 52);
    // The guest keeps an event buffer posted, as Linux does; nothing is owed to it yet.
    g.ev.push(&g.mem.clone(), 0, &[(EV_BUFS, 4, true)]);
    g.dev.process_queue(EVQ);
    assert!(g.ev.used(&g.mem).is_empty());
    let saved = g.dev.queue_states();
    assert_eq!(saved.len(), 3);

    // A new device (the restored VMM's) takes over the guest's queues where the old one left them.
    let uds = g.uds.with_extension("restored");
    let mut restored = Vsock::new(GUEST_CID, &uds).unwrap();
    restored.set_acked_features(VIRTIO_F_VERSION_1);
    let queues = saved.into_iter().map(|s| Queue::try_from(s).unwrap()).collect();
    let interrupt = Arc::new(Interrupt::new(g.irq.try_clone().unwrap()));
    restored.activate(g.mem.clone(), queues, interrupt).unwrap();
    restored.send_transport_reset();
    assert_eq!(g.ev.used(&g.mem), [(0, 4)]);
    assert_eq!(g.mem.read_obj::<u32>(GuestAddress(EV_BUFS)).unwrap(), EVENT_TRANSPORT_RESET);
    // The old connection is unknown to the new device: its packets are reset.
    g.dev = restored;
    g.send(Hdr::guest(1000, 52, OP_RW), b"x");
    assert_eq!(ops(&g.recv_refill(4096)), [OP_RST]);
}

#[test]
fn reset_closes_connections() {
    let mut g = Guest::new();
    g.give_rx(8, 4096);
    let listener = UnixListener::bind(g.host_path(52)).unwrap();
    let mut host = guest_connect(&mut g, &listener, 1000, 52);
    g.dev.reset();
    assert_eq!(g.dev.connection_count(), 0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0u8; 1]).unwrap(), 0);
    // A host client while the device is inactive is closed.
    let mut c = client(&g);
    c.write_all(b"CONNECT 5\n").unwrap();
    g.host();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
    let _ = read_available(&mut c);
}
