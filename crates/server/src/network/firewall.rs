//! The nftables rules that confine VMs' outbound traffic, as `nft -f`
//! scripts. Pure text, so that the rules are unit-tested as written.
//!
//! Every VM's tap is named `hv…`. The daemon's table refuses, for traffic
//! coming from any tap: the host itself (every local address, so the API,
//! the proxy, S3/Garage, PostgreSQL and whatever else listens), other VMs,
//! and addresses that are never "the internet" (link-local and the cloud
//! metadata service, loopback, multicast, the VMs' own range). Connections
//! into a VM's tap are refused too: inbound goes through the proxy. What
//! remains is checked against the VM's own egress policy, then NATed out.
//!
//! Several daemons may share a host, and a killed daemon's table stays
//! (its VMs run on). Every table applies the rules above to every tap (all
//! daemons want them), but judges egress only for its own taps (those in
//! its `egress_of` map): a blanket "drop what I do not know" would let one
//! daemon's table, or a dead daemon's, cut off the others' VMs.

use ipnet::Ipv4Net;

use crate::model::Egress;

/// Interface names of VM taps.
pub const TAP_PREFIX: &str = "hv";

/// Never reachable from a VM, whatever its policy.
const REFUSED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The daemon's table. Its base chains' rules are replaced (an earlier
/// run's, perhaps of another version, go) in one atomic script, while the
/// `egress_of` map and the per-VM chains stay: VMs that outlived the
/// daemon keep their egress policy without a gap until it is applied again.
pub fn table(name: &str, vm_range: Ipv4Net) -> String {
    let refused = REFUSED
        .iter()
        .map(|s| s.to_string())
        .chain([vm_range.to_string()])
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"table inet {name} {{
    map egress_of {{
        type ifname : verdict;
    }}
    chain input {{
        type filter hook input priority filter - 5; policy accept;
    }}
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
    }}
}}
flush chain inet {name} input
flush chain inet {name} forward
flush chain inet {name} postrouting
table inet {name} {{
    chain input {{
        iifname "{TAP_PREFIX}*" ct state established,related accept
        iifname "{TAP_PREFIX}*" drop
    }}
    chain forward {{
        iifname "{TAP_PREFIX}*" meta nfproto ipv6 drop
        iifname "{TAP_PREFIX}*" oifname "{TAP_PREFIX}*" drop
        iifname "{TAP_PREFIX}*" ip daddr {{ {refused} }} drop
        oifname "{TAP_PREFIX}*" ct state established,related accept
        oifname "{TAP_PREFIX}*" drop
        iifname "{TAP_PREFIX}*" iifname vmap @egress_of
    }}
    chain postrouting {{
        ip saddr {vm_range} oifname != "{TAP_PREFIX}*" masquerade
    }}
}}
"#
    )
}

/// Set the egress policy of tap `tap` (a chain of its own, reached from
/// the forward chain through the `egress_of` map). It is in place before
/// the VM's QEMU (and so its tap) exists.
pub fn set_vm(table: &str, tap: &str, egress: &Egress) -> String {
    let rules: Vec<String> = match egress {
        Egress::Allow => vec!["accept".into()],
        Egress::Deny => vec!["drop".into()],
        Egress::Only(nets) if nets.is_empty() => vec!["drop".into()],
        Egress::Only(nets) => {
            let list: Vec<String> = nets.iter().map(Ipv4Net::to_string).collect();
            vec![
                format!("ip daddr {{ {} }} accept", list.join(", ")),
                "drop".into(),
            ]
        }
    };
    let mut script = format!(
        "table inet {table} {{\n    chain vm_{tap} {{\n    }}\n}}\nflush chain inet {table} vm_{tap}\n"
    );
    for rule in rules {
        script.push_str(&format!("add rule inet {table} vm_{tap} {rule}\n"));
    }
    script.push_str(&format!(
        "add element inet {table} egress_of {{ \"{tap}\" : jump vm_{tap} }}\n"
    ));
    script
}

/// Forget tap `tap`'s policy (fails harmlessly if it had none).
pub fn remove_vm(table: &str, tap: &str) -> String {
    format!(
        "delete element inet {table} egress_of {{ \"{tap}\" }}\ndelete chain inet {table} vm_{tap}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_refuses_the_host_other_vms_and_non_internet_addresses() {
        let t = table("hatch_x", "10.200.0.0/16".parse().unwrap());
        assert!(t.starts_with("table inet hatch_x {\n"));
        assert!(
            !t.contains("delete table"),
            "running VMs keep their policies"
        );
        for chain in ["input", "forward", "postrouting"] {
            assert!(
                t.contains(&format!("flush chain inet hatch_x {chain}\n")),
                "{chain}"
            );
        }
        assert!(!t.contains("flush map") && !t.contains("vm_"));
        assert!(t.contains(r#"iifname "hv*" drop"#), "input from VMs");
        assert!(
            t.contains(r#"iifname "hv*" oifname "hv*" drop"#),
            "VM to VM"
        );
        assert!(t.contains("169.254.0.0/16") && t.contains("127.0.0.0/8"));
        assert!(t.contains("10.200.0.0/16 }"), "the VMs' own range");
        assert!(
            t.contains(r#"oifname "hv*" drop"#),
            "no inbound but replies"
        );
        assert!(t.contains(r#"iifname "hv*" iifname vmap @egress_of"#));
        // Only the input chain drops whatever comes from any tap: egress of
        // taps that are not this daemon's is their own daemon's to judge.
        assert_eq!(t.matches(r#"iifname "hv*" drop"#).count(), 1, "{t}");
        assert!(t.contains(r#"ip saddr 10.200.0.0/16 oifname != "hv*" masquerade"#));
    }

    #[test]
    fn egress_policies_become_verdicts() {
        let allow = set_vm("t", "hvab", &Egress::Allow);
        assert!(
            allow.contains("flush chain inet t vm_hvab\nadd rule inet t vm_hvab accept\n"),
            "{allow}"
        );
        assert!(allow.contains(r#"add element inet t egress_of { "hvab" : jump vm_hvab }"#));
        let deny = set_vm("t", "hvab", &Egress::Deny);
        assert!(deny.contains("add rule inet t vm_hvab drop\n"), "{deny}");
        let only = set_vm(
            "t",
            "hvab",
            &Egress::Only(vec![
                "198.18.0.0/24".parse().unwrap(),
                "1.2.3.4/32".parse().unwrap(),
            ]),
        );
        assert!(
            only.contains("vm_hvab ip daddr { 198.18.0.0/24, 1.2.3.4/32 } accept\nadd rule inet t vm_hvab drop\n"),
            "{only}"
        );
    }
}

#[cfg(test)]
mod nft_check {
    /// As root with nft installed (as in CI): nft accepts the scripts
    /// (`nft -c`: checked against the kernel, not applied).
    #[test]
    fn nft_accepts_the_scripts() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root
            || std::process::Command::new("nft")
                .arg("--version")
                .output()
                .is_err()
        {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let table = super::table("hatch_check", "10.200.0.0/16".parse().unwrap());
        let vm = super::set_vm(
            "hatch_check",
            "hvabc",
            &crate::model::Egress::Only(vec!["198.18.0.0/15".parse().unwrap()]),
        );
        let script = format!("{table}{vm}");
        let mut child = std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
