//! Owned libibverbs resources: a device context with its protection domain,
//! completion queue and RC queue pair, and page-aligned buffers registered
//! as memory regions. Everything is released in reverse order on drop: the
//! queue pair first (after which the NIC touches no buffer), then the memory
//! regions, the CQ, the PD, the context; the buffers are unmapped last.

use std::ffi::CStr;
use std::ptr::{NonNull, null_mut};

use rdma_sys::*;

use super::super::TransportError;

/// `errno` after a failed verbs call, as a transport error.
pub fn verbs_err(op: &'static str) -> TransportError {
    let source = std::io::Error::last_os_error();
    TransportError::Io { op, source }
}

/// A verbs call that returns an errno value (0 on success).
pub fn check_rc(op: &'static str, rc: i32) -> Result<(), TransportError> {
    if rc == 0 {
        return Ok(());
    }
    // Verbs return either -1 with errno or the positive errno itself.
    let source = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    Err(TransportError::Io { op, source })
}

/// A device found by [`list_devices`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kernel name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
}

/// The RDMA devices of this host; `NoRdmaDevice` if there are none (or
/// libibverbs cannot list them).
pub fn list_devices() -> Result<Vec<DeviceInfo>, TransportError> {
    let list = DeviceList::get()?;
    let names = list.names();
    if names.is_empty() {
        return Err(TransportError::NoRdmaDevice {
            detail: "libibverbs lists no device (no RDMA NIC, no rdma_rxe/siw link, or no provider library)".into(),
        });
    }
    Ok(names.into_iter().map(|name| DeviceInfo { name }).collect())
}

/// The list returned by `ibv_get_device_list`, freed on drop.
pub struct DeviceList {
    list: *mut *mut ibv_device,
    n: usize,
}

impl DeviceList {
    /// Lists the devices.
    pub fn get() -> Result<Self, TransportError> {
        let mut n: i32 = 0;
        // SAFETY: ibv_get_device_list writes the count into `n` and returns
        // a NULL-terminated array it allocated (or NULL on failure).
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = std::io::Error::last_os_error();
            return Err(TransportError::NoRdmaDevice {
                detail: format!("ibv_get_device_list failed: {e}"),
            });
        }
        Ok(Self {
            list,
            n: n.max(0) as usize,
        })
    }

    fn device(&self, i: usize) -> *mut ibv_device {
        debug_assert!(i < self.n);
        // SAFETY: i < n, the number of entries ibv_get_device_list returned.
        unsafe { *self.list.add(i) }
    }

    /// Device names, in the library's order.
    pub fn names(&self) -> Vec<String> {
        (0..self.n)
            .map(|i| {
                // SAFETY: a device of the live list; the name is a
                // NUL-terminated string owned by the device.
                unsafe { CStr::from_ptr(ibv_get_device_name(self.device(i))) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Opens device `i`.
    pub fn open(&self, i: usize) -> Result<Context, TransportError> {
        // SAFETY: a device of the live list; the context outlives the list
        // (libibverbs keeps devices alive while a context is open).
        let ctx = unsafe { ibv_open_device(self.device(i)) };
        NonNull::new(ctx)
            .map(|ctx| Context { ctx })
            .ok_or_else(|| verbs_err("ibv_open_device"))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed once.
        unsafe { ibv_free_device_list(self.list) };
    }
}

/// An open device context, closed on drop (after everything made from it).
pub struct Context {
    ctx: NonNull<ibv_context>,
}

/// Port attributes we use.
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    /// `IBV_PORT_ACTIVE` etc.
    pub state: u32,
    /// Active MTU (ibv_mtu: 1 = 256 B .. 5 = 4096 B).
    pub active_mtu: u32,
    /// Local id (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Link layer: 1 InfiniBand, 2 Ethernet.
    pub link_layer: u8,
}

impl Context {
    /// The raw context.
    pub fn raw(&self) -> *mut ibv_context {
        self.ctx.as_ptr()
    }

    /// Queries `port`.
    pub fn port(&self, port: u8) -> Result<PortInfo, TransportError> {
        // SAFETY: ibv_port_attr is plain data; zero is a valid value.
        let mut a: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a pointer to a port_attr to fill in.
        let rc = unsafe { ___ibv_query_port(self.raw(), port, &mut a) };
        check_rc("ibv_query_port", rc)?;
        Ok(PortInfo {
            state: a.state,
            active_mtu: a.active_mtu,
            lid: a.lid,
            link_layer: a.link_layer,
        })
    }

    /// GID `index` of `port`, raw bytes.
    pub fn gid(&self, port: u8, index: u8) -> Result<[u8; 16], TransportError> {
        // SAFETY: ibv_gid is a union of plain bytes; zero is valid.
        let mut g: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a pointer to one ibv_gid.
        let rc = unsafe { ibv_query_gid(self.raw(), port, i32::from(index), &mut g) };
        check_rc("ibv_query_gid", rc)?;
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        Ok(unsafe { g.raw })
    }

    /// Makes the async event fd non-blocking so [`Context::async_event`]
    /// never waits.
    pub fn nonblocking_async(&self) -> Result<(), TransportError> {
        // SAFETY: reading a field of the live context.
        let fd = unsafe { (*self.raw()).async_fd };
        // SAFETY: fcntl on the context's own fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(TransportError::last_os(
                "making the verbs async fd non-blocking",
            ));
        }
        Ok(())
    }

    /// The next asynchronous event (device fatal, QP fatal, port down...),
    /// acknowledged, as (type number, name); `None` if there is none.
    pub fn async_event(&self) -> Option<(u32, String)> {
        let mut ev = std::mem::MaybeUninit::<ibv_async_event>::zeroed();
        // SAFETY: the fd is non-blocking, so this returns at once; on
        // success it fills `ev`.
        if unsafe { ibv_get_async_event(self.raw(), ev.as_mut_ptr()) } != 0 {
            return None;
        }
        // Read the type as a plain u32: the binding's Rust enum cannot hold
        // values a newer kernel might add.
        // SAFETY: the call filled the struct; event_type is a C enum (u32).
        let kind = unsafe { (&raw const (*ev.as_ptr()).event_type).cast::<u32>().read() };
        // SAFETY: the event from ibv_get_async_event is acknowledged once.
        unsafe { ibv_ack_async_event(ev.as_mut_ptr()) };
        Some((kind, event_name(kind).to_string()))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object made from this context is gone (the owner
        // drops them first); the context is closed once.
        unsafe { ibv_close_device(self.raw()) };
    }
}

/// Name of an async event type (from `ibv_event_type`).
pub fn event_name(kind: u32) -> &'static str {
    match kind {
        0 => "CQ error (overrun)",
        1 => "QP fatal error",
        2 => "QP request error",
        3 => "QP access error",
        4 => "communication established",
        5 => "send queue drained",
        6 => "path migrated",
        7 => "path migration error",
        8 => "device fatal error (device gone)",
        9 => "port active",
        10 => "port error (link down)",
        11 => "LID change",
        12 => "P_Key change",
        13 => "SM change",
        14 => "SRQ error",
        15 => "SRQ limit reached",
        16 => "QP last WQE reached",
        17 => "client re-register",
        18 => "GID table change",
        19 => "WQ fatal error",
        _ => "unknown event",
    }
}

/// True for async events after which the channel cannot go on.
pub fn event_is_fatal(kind: u32) -> bool {
    matches!(kind, 0 | 1 | 2 | 3 | 7 | 8 | 10 | 19)
}

/// A failed work completion's status, in words.
pub fn wc_status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}

/// Page-aligned anonymous memory, unmapped on drop.
pub struct Buf {
    ptr: NonNull<u8>,
    len: usize,
}

impl Buf {
    /// `len` zeroed bytes (rounded up to pages), populated up front.
    pub fn new(len: usize) -> Result<Self, TransportError> {
        let len = len.next_multiple_of(4096);
        // SAFETY: a fresh private anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(TransportError::last_os("mmap of an RDMA buffer"));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or(TransportError::BadRegion("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The whole buffer. Callers only read bytes the NIC is not writing (by
    /// the ring protocol) or read them with volatile loads.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe our live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer, mutable (for building frames in the staging ring).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe our live mapping, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; the memory region
        // registered on it was deregistered before (field order in the owner).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The verbs objects of one connection: PD, a completion channel, one CQ
/// for both queues (raising its events on the channel), the RC QP and the
/// memory regions. Dropped before the buffers they cover.
pub struct Verbs {
    pub pd: *mut ibv_pd,
    pub channel: *mut ibv_comp_channel,
    pub cq: *mut ibv_cq,
    pub qp: *mut ibv_qp,
    pub mrs: Vec<*mut ibv_mr>,
    // Last: closed after everything above is destroyed.
    pub ctx: Context,
}

impl Verbs {
    /// PD, a non-blocking completion channel and a CQ of `cqe` entries
    /// on `ctx`.
    pub fn new(ctx: Context, cqe: i32) -> Result<Self, TransportError> {
        let mut v = Self {
            pd: null_mut(),
            channel: null_mut(),
            cq: null_mut(),
            qp: null_mut(),
            mrs: Vec::new(),
            ctx,
        };
        // SAFETY: a live context.
        v.pd = unsafe { ibv_alloc_pd(v.ctx.raw()) };
        if v.pd.is_null() {
            return Err(verbs_err("ibv_alloc_pd"));
        }
        // SAFETY: a live context.
        v.channel = unsafe { ibv_create_comp_channel(v.ctx.raw()) };
        if v.channel.is_null() {
            return Err(verbs_err("ibv_create_comp_channel"));
        }
        let fd = v.event_fd();
        // SAFETY: fcntl on the channel's own fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(TransportError::last_os(
                "making the completion channel non-blocking",
            ));
        }
        // SAFETY: a live context and completion channel; no context pointer.
        v.cq = unsafe { ibv_create_cq(v.ctx.raw(), cqe, null_mut(), v.channel, 0) };
        if v.cq.is_null() {
            return Err(verbs_err("ibv_create_cq"));
        }
        Ok(v)
    }

    /// The completion channel's fd: readable once the armed CQ got a
    /// completion (see [`Verbs::arm`]).
    pub fn event_fd(&self) -> i32 {
        // SAFETY: a live channel (created in `new`, destroyed in `drop`).
        unsafe { (*self.channel).fd }
    }

    /// Asks for one event on the channel at the CQ's next completion.
    pub fn arm(&self) -> Result<(), TransportError> {
        // SAFETY: a live CQ.
        let rc = unsafe { ibv_req_notify_cq(self.cq, 0) };
        check_rc("ibv_req_notify_cq", rc)
    }

    /// Takes and acknowledges every event waiting on the channel (the fd is
    /// non-blocking); returns how many there were.
    pub fn take_events(&self) -> u32 {
        let mut n = 0u32;
        loop {
            let mut cq = null_mut();
            let mut ctx = null_mut();
            // SAFETY: a live, non-blocking channel: returns at once, filling
            // the two pointers on success.
            if unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: `n` events of our CQ (the only one on the channel)
            // were taken above and are acknowledged once, as destroying the
            // CQ requires.
            unsafe { ibv_ack_cq_events(self.cq, n) };
        }
        n
    }

    /// Registers `buf` with `access` flags; returns (lkey, rkey).
    pub fn register(&mut self, buf: &Buf, access: u32) -> Result<(u32, u32), TransportError> {
        // SAFETY: buf is a live mapping of buf.len() bytes that outlives the
        // MR (the owner drops `Verbs`, which deregisters, before any `Buf`).
        let mr = unsafe { ibv_reg_mr(self.pd, buf.ptr().cast(), buf.len(), access as i32) };
        if mr.is_null() {
            let e = std::io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::ENOMEM) {
                " (pinning failed: raise the memlock limit, `ulimit -l`, LimitMEMLOCK=)"
            } else {
                ""
            };
            return Err(TransportError::Io {
                op: "ibv_reg_mr",
                source: std::io::Error::new(e.kind(), format!("{e}{hint}")),
            });
        }
        self.mrs.push(mr);
        // SAFETY: mr is a live MR returned above.
        Ok(unsafe { ((*mr).lkey, (*mr).rkey) })
    }

    /// Creates the RC QP on the CQ.
    pub fn create_qp(&mut self, send_wr: u32, recv_wr: u32) -> Result<u32, TransportError> {
        // SAFETY: plain data; zero is a valid start.
        let mut ia: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        ia.send_cq = self.cq;
        ia.recv_cq = self.cq;
        ia.qp_type = ibv_qp_type::IBV_QPT_RC;
        ia.cap.max_send_wr = send_wr;
        ia.cap.max_recv_wr = recv_wr;
        ia.cap.max_send_sge = 1;
        ia.cap.max_recv_sge = 1;
        // SAFETY: a live PD and CQ, and an initialized attribute struct.
        self.qp = unsafe { ibv_create_qp(self.pd, &mut ia) };
        if self.qp.is_null() {
            return Err(verbs_err("ibv_create_qp"));
        }
        // SAFETY: a live QP.
        Ok(unsafe { (*self.qp).qp_num })
    }

    /// RESET -> INIT, allowing remote writes.
    pub fn to_init(&self, port: u8) -> Result<(), TransportError> {
        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: a live QP and an initialized attribute struct.
        let rc = unsafe { ibv_modify_qp(self.qp, &mut a, m.0 as i32) };
        check_rc("ibv_modify_qp to INIT", rc)
    }

    /// Any state -> ERR: the QP stops taking the peer's writes (its NIC's
    /// next write fails) and every outstanding request completes, flushed.
    pub fn to_error(&self) -> Result<(), TransportError> {
        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        let m = ibv_qp_attr_mask::IBV_QP_STATE;
        // SAFETY: a live QP and an initialized attribute struct.
        let rc = unsafe { ibv_modify_qp(self.qp, &mut a, m.0 as i32) };
        check_rc("ibv_modify_qp to ERR", rc)
    }

    /// INIT -> RTR -> RTS towards the peer.
    #[allow(clippy::too_many_arguments)]
    pub fn to_rts(
        &self,
        port: u8,
        sgid_index: u8,
        mtu: u32,
        peer: &super::PeerInfo,
        our_psn: u32,
        timeout: u8,
        retry_cnt: u8,
    ) -> Result<(), TransportError> {
        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = mtu;
        a.dest_qp_num = peer.qpn;
        a.rq_psn = peer.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
        a.ah_attr.grh.sgid_index = sgid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.dlid = peer.lid;
        a.ah_attr.port_num = port;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: a live QP and an initialized attribute struct.
        let rc = unsafe { ibv_modify_qp(self.qp, &mut a, m.0 as i32) };
        check_rc("ibv_modify_qp to RTR", rc)?;

        // SAFETY: plain data.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = timeout;
        a.retry_cnt = retry_cnt;
        a.rnr_retry = 7;
        a.sq_psn = our_psn;
        a.max_rd_atomic = 1;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: as above.
        let rc = unsafe { ibv_modify_qp(self.qp, &mut a, m.0 as i32) };
        check_rc("ibv_modify_qp to RTS", rc)
    }

    /// Posts `n` receive requests without buffers (WRITE WITH IMM consumes
    /// a receive request but places its data by address).
    pub fn post_recvs(&self, n: usize, wr_id: u64) -> Result<(), TransportError> {
        for _ in 0..n {
            // SAFETY: plain data; no scatter list.
            let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = wr_id;
            let mut bad = null_mut();
            // SAFETY: a live QP; the WR has no buffers to keep alive.
            let rc = unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) };
            check_rc("ibv_post_recv", rc)?;
        }
        Ok(())
    }

    /// Posts one signaled RDMA WRITE (with immediate if `imm` is given) of
    /// `len` bytes at `local` (lkey) to `remote` (rkey).
    #[allow(clippy::too_many_arguments)]
    pub fn post_write(
        &self,
        wr_id: u64,
        local: u64,
        lkey: u32,
        len: u32,
        remote: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), TransportError> {
        let mut sge = ibv_sge {
            addr: local,
            length: len,
            lkey,
        };
        // SAFETY: plain data; zero is a valid start.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        match imm {
            Some(v) => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                wr.imm_data_invalidated_rkey_union.imm_data = v.to_be();
            }
            None => wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        }
        wr.wr.rdma.remote_addr = remote;
        wr.wr.rdma.rkey = rkey;
        let mut bad = null_mut();
        // SAFETY: a live QP; the sge and wr are read during the call only,
        // and the bytes they name belong to a registered buffer the caller
        // keeps untouched until the completion is polled.
        let rc = unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) };
        check_rc("ibv_post_send", rc)
    }

    /// Polls up to `wcs.len()` completions; returns how many were filled.
    pub fn poll(&self, wcs: &mut [ibv_wc]) -> Result<usize, TransportError> {
        // SAFETY: a live CQ and room for wcs.len() entries.
        let n = unsafe { ibv_poll_cq(self.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(TransportError::PeerFailed {
                op: "polling the completion queue",
                reason: format!("ibv_poll_cq returned {n} (device or CQ in error)"),
            });
        }
        // Pairs with the provider's barrier: data placed before the
        // completion is visible after it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Ok(n as usize)
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        // Destroying the QP first guarantees the NIC no longer accesses any
        // registered buffer; then the MRs, the CQ and the PD. Errors here
        // cannot be acted on.
        // SAFETY: each object is live (non-null) and destroyed exactly once,
        // children before parents.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            for &mr in &self.mrs {
                ibv_dereg_mr(mr);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
        }
    }
}

/// A zeroed work-completion array.
pub fn wc_array<const N: usize>() -> [ibv_wc; N] {
    // SAFETY: ibv_wc is plain data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// (wr_id, status, opcode, byte_len, imm) of a completion.
pub fn wc_fields(wc: &ibv_wc) -> (u64, u32, u32, u32, u32) {
    // SAFETY: the union holds the immediate for WRITE WITH IMM completions;
    // every bit pattern is a valid u32 either way.
    let imm = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
    (wc.wr_id, wc.status, wc.opcode, wc.byte_len, imm)
}
