//! `vpnshare`: the command line of VPN Share (design §6).

fn main() {
    println!("vpnshare: under construction");
}
