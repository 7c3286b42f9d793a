//! The AF_VSOCK listener.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    accept4, bind, getpeername, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use tokio::io::unix::AsyncFd;

use crate::fdio::FdStream;

/// A listening vsock socket.
#[derive(Debug)]
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Listens on `port` for any CID. Must be called inside a tokio runtime.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
        Ok(Self {
            fd: crate::fdio::register(fd)?,
        })
    }

    /// Accepts the next connection: the stream and the peer's CID.
    pub async fn accept(&self) -> io::Result<(FdStream, u32)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
            }) {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 just returned this fd; nothing else owns it.
                    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                    let cid = getpeername::<VsockAddr>(conn.as_raw_fd())?.cid();
                    return Ok((FdStream::new(conn)?, cid));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
