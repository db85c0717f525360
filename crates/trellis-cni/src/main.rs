//! `trellis-cni`: the CNI plugin binary (also `trellis-ipam` under that name).

fn main() {
    std::process::exit(trellis_cni::main_entry());
}
