//! The soak's own NBD client: fixed newstyle, `NBD_OPT_GO`, simple replies,
//! one request at a time, with FUA writes and socket timeouts (a stopped or
//! killed node must fail a writer, not hang it for ever).
//!
//! Invariants: a reply must carry the handle of the request it answers; a
//! length read from the server is bounded before anything is allocated.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;
const OPTION_REPLY_MAX_BYTES: u32 = 64 << 10;

/// One open export.
pub struct Nbd {
    s: TcpStream,
    export: String,
    pub size_bytes: u64,
    handle: u64,
}

impl Nbd {
    /// Connect to `addr`, open `export`; every socket read and write times
    /// out after `timeout`.
    pub fn open(addr: &str, export: &str, timeout: Duration) -> Result<Nbd> {
        let sock: std::net::SocketAddr = addr.parse().context("NBD address")?;
        let s = TcpStream::connect_timeout(&sock, timeout)
            .with_context(|| format!("NBD connect {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let _ = s.set_nodelay(true);
        let mut c = Nbd {
            s,
            export: export.to_string(),
            size_bytes: 0,
            handle: 1,
        };
        c.handshake()
            .with_context(|| format!("NBD handshake {addr}/{export}"))?;
        Ok(c)
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn handshake(&mut self) -> Result<()> {
        if self.u64()? != NBDMAGIC || self.u64()? != IHAVEOPT {
            bail!("not a fixed-newstyle NBD server");
        }
        let mut server_flags = [0u8; 2];
        self.s.read_exact(&mut server_flags)?;
        let name = self.export.as_bytes().to_vec();
        let mut out = Vec::new();
        out.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&(name.len() as u32 + 6).to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(&name);
        out.extend_from_slice(&0u16.to_be_bytes());
        self.s.write_all(&out)?;
        loop {
            if self.u64()? != OPT_REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _opt = self.u32()?;
            let kind = self.u32()?;
            let len = self.u32()?;
            if len > OPTION_REPLY_MAX_BYTES {
                bail!("option reply of {len} bytes");
            }
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data)?;
            match kind {
                REP_ACK => return Ok(()),
                REP_INFO if data.len() >= 10 && data[..2] == [0, 0] => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    self.size_bytes = u64::from_be_bytes(b);
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    bail!("refused: {}", String::from_utf8_lossy(&data))
                }
                k => bail!("unexpected option reply {k}"),
            }
        }
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        let handle = self.handle;
        self.handle += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.s.write_all(&h)?;
        if self.u32()? != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic");
        }
        let errno = self.u32()?;
        if self.u64()? != handle {
            bail!("reply for another request");
        }
        if errno != 0 {
            bail!(
                "{}: command {cmd} at {offset} failed with errno {errno}",
                self.export
            );
        }
        Ok(())
    }

    /// Write `data` at `offset`; with `fua` it is durable when this returns.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.request(CMD_READ, 0, offset, len, &[])?;
        let mut buf = vec![0u8; len as usize];
        self.s.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&CMD_DISC.to_be_bytes());
        h.extend_from_slice(&[0u8; 20]);
        let _ = self.s.write_all(&h);
    }
}
