//! What the backends' tests share: running a prepared backend on a pipe pair, addresses, events,
//! scratch directories and frames.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BackendContext, BackendEvent, BackendStats, datagram::PreparedDatagram, stream::PreparedStream};
use crate::port::pipe::{HubPipe, MAX_FRAME};
use crate::netdev::sockaddr::{InetSocketAddress, SocketAddress, UnixSocketAddress};

/// A prepared backend the tests run on a pipe pair.
pub trait Runnable: Send + 'static {
    fn run_on(self, pipe: HubPipe, ctx: BackendContext) -> impl Future<Output = ()> + Send + 'static;
}

impl Runnable for PreparedStream {
    fn run_on(self, pipe: HubPipe, ctx: BackendContext) -> impl Future<Output = ()> + Send + 'static {
        self.run(pipe, ctx)
    }
}

impl Runnable for PreparedDatagram {
    fn run_on(self, pipe: HubPipe, ctx: BackendContext) -> impl Future<Output = ()> + Send + 'static {
        self.run(pipe, ctx)
    }
}

/// Starts `prepared` on one end of a pipe pair; returns the hub's end.
pub fn start(prepared: impl Runnable, ctx: &BackendContext) -> (HubPipe, tokio::task::JoinHandle<()>) {
    let (backend_end, hub_end) = HubPipe::pair().unwrap();
    let task = tokio::spawn(prepared.run_on(backend_end, ctx.clone()));
    (hub_end, task)
}

/// Cancels the backend and waits for it to close everything.
pub async fn stop(ctx: &BackendContext, task: tokio::task::JoinHandle<()>) {
    ctx.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("the backend stops").unwrap();
}

pub fn inet(host: &str, port: u16) -> SocketAddress {
    SocketAddress::Inet(InetSocketAddress { host: host.to_owned(), port: port.to_string(), ..Default::default() })
}

pub fn unix(path: &str) -> SocketAddress {
    SocketAddress::Unix(UnixSocketAddress {
        path: path.to_owned(),
        abstract_: None,
        tight: None,
    })
}

pub type Events = mpsc::UnboundedReceiver<(String, BackendEvent)>;

pub fn context() -> (BackendContext, Events) {
    let (events, received) = mpsc::unbounded_channel();
    let ctx = BackendContext {
        id: "n0".to_owned(),
        events,
        stats: Arc::new(BackendStats::default()),
        info: Arc::new(std::sync::Mutex::new(String::new())),
        cancel: CancellationToken::new(),
    };
    (ctx, received)
}

pub async fn next_event(events: &mut Events) -> BackendEvent {
    let received = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await;
    received
        .expect("an event within 5 s")
        .expect("the channel is open")
        .1
}

pub fn info(ctx: &BackendContext) -> String {
    ctx.info.lock().unwrap().clone()
}

pub fn counter(value: &std::sync::atomic::AtomicU64) -> u64 {
    value.load(std::sync::atomic::Ordering::Relaxed)
}

/// A scratch directory for socket files, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("netdevd-{tag}-{}-{unique}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An Ethernet-sized test frame.
pub fn frame(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_add(u8::try_from(i % 251).unwrap()))
        .collect()
}

pub async fn recv_frame(pipe: &HubPipe) -> Vec<u8> {
    let mut buf = vec![0; MAX_FRAME];
    let len = tokio::time::timeout(std::time::Duration::from_secs(5), pipe.recv(&mut buf))
        .await
        .expect("a frame within 5 s")
        .unwrap();
    buf.truncate(len);
    buf
}
