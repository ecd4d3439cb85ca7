//! Choosing between KVM and TCG.
//!
//! KVM is right where the CPU has hardware virtualization (vmx/svm) and
//! /dev/kvm opens. The development machines expose a nested PVM `/dev/kvm`
//! without vmx/svm, on which stock kernels crawl and `-cpu host` aborts, so
//! the flag check matters: /dev/kvm existing is not enough.

use std::fmt;
use std::str::FromStr;

use crate::VmmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(VmmError::UnknownAccel(other.to_string())),
        }
    }
}

impl AccelChoice {
    /// Resolve `auto` by looking at this host.
    pub fn resolve(self) -> Accel {
        match self {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                let kvm_opens = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                auto_choice(&cpuinfo, kvm_opens)
            }
        }
    }
}

fn auto_choice(cpuinfo: &str, kvm_opens: bool) -> Accel {
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if has_virt && kvm_opens {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_both_the_cpu_flag_and_the_device() {
        let vmx = "processor : 0\nflags : fpu vme vmx sse\n";
        let pvm = "processor : 0\nflags : fpu vme sse hypervisor\n";
        assert_eq!(auto_choice(vmx, true), Accel::Kvm);
        assert_eq!(auto_choice(vmx, false), Accel::Tcg);
        assert_eq!(auto_choice(pvm, true), Accel::Tcg);
        assert_eq!(auto_choice("flags : svm\n", true), Accel::Kvm);
    }

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("hvf".parse::<AccelChoice>().is_err());
    }
}
