//! A minimal blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time, FUA writes, optional socket timeouts):
//! what `sluice demo` and the soak harness's writers use, so they need
//! nothing but this binary. Real clients (`qemu-io`, `qemu-img`, `fio`) are
//! what the tests use.
//!
//! Invariants: every length read from the server is bounded before
//! allocating; a reply whose handle is not the request's is an error.

use crate::error::{NodeError, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;
const OPTION_REPLY_MAX: u32 = 64 << 10;

/// One open export.
pub struct NbdClient {
    s: TcpStream,
    export: String,
    /// Export size in bytes.
    pub size: u64,
    next_handle: u64,
}

fn proto(export: &str, what: impl Into<String>) -> NodeError {
    NodeError::Invalid(format!("NBD export {export:?}: {}", what.into()))
}

impl NbdClient {
    /// Connect to `addr` and open `export`.
    pub fn open(addr: &str, export: &str) -> Result<NbdClient> {
        let s = TcpStream::connect(addr).map_err(|source| NodeError::Unreachable {
            addr: addr.to_string(),
            source,
        })?;
        Self::on(s, export)
    }

    /// Connect to `addr` and open `export`; the connect and every socket
    /// read and write time out after `timeout` (a stopped or killed server
    /// fails the caller instead of hanging it).
    pub fn open_with_timeout(addr: &str, export: &str, timeout: Duration) -> Result<NbdClient> {
        let unreachable = |source| NodeError::Unreachable {
            addr: addr.to_string(),
            source,
        };
        let sock: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| unreachable(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let s = TcpStream::connect_timeout(&sock, timeout).map_err(unreachable)?;
        s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
        s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
        Self::on(s, export)
    }

    fn on(s: TcpStream, export: &str) -> Result<NbdClient> {
        let _ = s.set_nodelay(true);
        let mut c = NbdClient {
            s,
            export: export.to_string(),
            size: 0,
            next_handle: 1,
        };
        c.handshake()?;
        Ok(c)
    }

    fn io<T>(&self, r: std::io::Result<T>) -> Result<T> {
        r.map_err(NodeError::io(format!("NBD export {}", self.export)))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        let r = self.s.read_exact(&mut b);
        self.io(r)?;
        Ok(u64::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        let r = self.s.read_exact(&mut b);
        self.io(r)?;
        Ok(u32::from_be_bytes(b))
    }

    fn handshake(&mut self) -> Result<()> {
        if self.u64()? != NBDMAGIC || self.u64()? != IHAVEOPT {
            return Err(proto(
                &self.export,
                "server is not a fixed-newstyle NBD server",
            ));
        }
        let mut flags = [0u8; 2];
        let r = self.s.read_exact(&mut flags);
        self.io(r)?;
        // FIXED_NEWSTYLE | NO_ZEROES
        let mut out = 3u32.to_be_bytes().to_vec();
        let name = self.export.as_bytes();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&0u16.to_be_bytes());
        let r = self.s.write_all(&out);
        self.io(r)?;
        loop {
            if self.u64()? != REPLY_MAGIC {
                return Err(proto(&self.export, "bad option reply magic"));
            }
            let _opt = self.u32()?;
            let kind = self.u32()?;
            let len = self.u32()?;
            if len > OPTION_REPLY_MAX {
                return Err(proto(&self.export, format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            let r = self.s.read_exact(&mut data);
            self.io(r)?;
            match kind {
                REP_ACK => return Ok(()),
                REP_INFO if data.len() >= 10 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    self.size = u64::from_be_bytes(b);
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    return Err(proto(
                        &self.export,
                        format!("refused: {}", String::from_utf8_lossy(&data)),
                    ))
                }
                k => return Err(proto(&self.export, format!("unexpected option reply {k}"))),
            }
        }
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        let r = self.s.write_all(&h);
        self.io(r)?;
        Ok(handle)
    }

    fn reply(&mut self, handle: u64, what: &str) -> Result<()> {
        if self.u32()? != SIMPLE_REPLY_MAGIC {
            return Err(proto(&self.export, "bad reply magic"));
        }
        let err = self.u32()?;
        if self.u64()? != handle {
            return Err(proto(&self.export, "reply for another request"));
        }
        if err != 0 {
            return Err(proto(
                &self.export,
                format!("{what} failed with errno {err}"),
            ));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, 0)
    }

    /// Write `data` at `offset`, durable when this returns (FUA).
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, CMD_FLAG_FUA)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| proto(&self.export, "write too large"))?;
        let h = self.request(CMD_WRITE, flags, offset, len, data)?;
        self.reply(h, "write")
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let h = self.request(CMD_READ, 0, offset, len, &[])?;
        self.reply(h, "read")?;
        let mut buf = vec![0u8; len as usize];
        let r = self.s.read_exact(&mut buf);
        self.io(r)?;
        Ok(buf)
    }

    pub fn flush(&mut self) -> Result<()> {
        let h = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(h, "flush")
    }
}

impl Drop for NbdClient {
    /// Sends `NBD_CMD_DISC` and waits (at most 5 s) for the server to close
    /// its end, so that when a client is gone the server has counted it out
    /// (a `snap rollback` right after sees no writer).
    fn drop(&mut self) {
        if self.request(CMD_DISC, 0, 0, 0, &[]).is_err() {
            return;
        }
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        let _ = self.s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut sink = [0u8; 512];
        while matches!(self.s.read(&mut sink), Ok(n) if n > 0) {}
    }
}
