//! The emulated hosts of a run: one [`testbed::Testbed`] (a client, host a
//! for the primary or the lone VM, host b for the backup), reshaped before
//! each measurement to that measurement's client and logging links.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use testbed::{Link, Ns, Rate, Testbed};

/// The testbed, and the shaping it has now.
pub struct Hosts {
    bed: Testbed,
    /// (client link, logging link) as last set.
    shaped: Option<(Rate, Rate)>,
}

fn rate(mbit: Option<u32>) -> Rate {
    mbit.map_or(Rate::Unshaped, |m| Rate::Mbit(u64::from(m)))
}

impl Hosts {
    /// Brings up a testbed of its own (removed on drop).
    pub fn up() -> Result<Self, String> {
        let bed = Testbed::up(&testbed::Config::new("bench"))
            .map_err(|e| format!("cannot build the testbed: {}", chain(&e)))?;
        Ok(Self { bed, shaped: None })
    }

    /// Shapes both hosts' client links to `client_mbit` and the logging link
    /// to `log_mbit` (`None`: unshaped), each way; does nothing if they
    /// already are.
    pub fn shape(&mut self, client_mbit: Option<u32>, log_mbit: Option<u32>) -> Result<(), String> {
        let want = (rate(client_mbit), rate(log_mbit));
        if self.shaped == Some(want) {
            return Ok(());
        }
        for (link, rate) in [
            (Link::ClientA, want.0),
            (Link::ClientB, want.0),
            (Link::Log, want.1),
        ] {
            self.bed
                .set_rate(link, rate)
                .map_err(|e| format!("cannot shape the {link} link to {rate}: {}", chain(&e)))?;
        }
        self.shaped = Some(want);
        Ok(())
    }

    /// A command running `exe` inside host `ns`.
    pub fn command(&self, ns: Ns, exe: &Path) -> Result<Command, String> {
        self.bed
            .command(ns, exe)
            .map_err(|e| format!("cannot run {} in {ns:?}: {}", exe.display(), chain(&e)))
    }

    /// Runs `f` on a thread inside the client's namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        self.bed
            .run_in(Ns::Client, f)
            .map_err(|e| format!("cannot run the client: {}", chain(&e)))
    }

    /// The guest's address on the client segment.
    pub fn guest(&self) -> Ipv4Addr {
        self.bed.addresses().guest
    }

    /// The `net` guest's `--arg` for that address.
    pub fn guest_arg(&self) -> u64 {
        self.bed.addresses().guest_arg()
    }

    /// Host b's end of the logging link.
    pub fn log_b(&self) -> Ipv4Addr {
        self.bed.addresses().log_b
    }

    /// The TAP the VMM attaches to, in either host.
    pub fn tap(&self) -> &'static str {
        testbed::TAP
    }

    /// `lst-<run>` and the shaping, for the report.
    pub fn describe(&self) -> String {
        format!(
            "testbed {} (namespaces {}, {}, {})",
            self.bed.run_id(),
            self.bed.netns(Ns::Client),
            self.bed.netns(Ns::A),
            self.bed.netns(Ns::B)
        )
    }
}

/// An error and its sources, one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
