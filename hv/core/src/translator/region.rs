//! Region formation over the guest's control-flow graph (module docs of
//! [`super`], rules 2 to 5): explore from the entry along every path, keep what
//! leads to an exiting instruction, lay it out for the engine.
//!
//! A *node* is one instruction in one call context: the return addresses the
//! region pushed to reach it (a callee reached from two call sites is two sets of
//! nodes, each returning to its own caller). The exploration is a breadth-first
//! search that relaxes each node's distance from the last exiting instruction on
//! the way to it, so every path is held to the paper's window and gap rules by its
//! shortest approach.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;

use super::{decode_at, ends_cluster, CodeSource, NoCluster, Translated, TranslatorConfig};
use crate::ir::{
    limits, successors, BackEdge, Bitness, Cluster, CodeRange, Guard, Insn, LearnSite, Op, Target,
};
use crate::lower::lower;
use crate::policy::{ExitClass, ExitPolicy};

mod gap;
use gap::Gap;

/// One decoded address (shared by every context).
#[derive(Clone, Copy)]
struct Decoded {
    len: u8,
    op: Op,
    exit_class: Option<ExitClass>,
}

/// A call context: a [`Frame`] for each call the region made, and, inside a thunk
/// (Linux's `__x86_indirect_thunk_<reg>` or return thunk,
/// [`super::source::Thunk`]), the address of the CALL or JMP that entered it: the
/// thunk's indirect JMP or RET goes where that site's destinations say.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Context {
    frames: Vec<Frame>,
    via: Option<u64>,
}

/// A call the region made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Frame {
    callee: u64,
    ret: u64,
    /// The site that entered the thunk this call was made in. A retpoline's inner
    /// call (`call 1f; ...; 1: mov %reg, (%rsp); ret`) has its return address
    /// overwritten: its RET goes where the site's destinations say, not to `ret`.
    thunk_site: Option<u64>,
}

/// Where an edge of a node leads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// Falls through to the next instruction.
    Fall(usize),
    /// A direct branch or call to a node.
    Direct(usize),
    /// A guarded destination (indirect branch or RET) that is a node.
    Guarded { expect: u64, node: usize },
}

struct Node {
    rip: u64,
    ctx: usize,
    dec: Decoded,
    /// The gap after this node on the shortest way here found so far.
    since: Gap,
    edges: Vec<Edge>,
    /// A guarded instruction with no known destination yet: the region keeps it
    /// (and the way to it), because the first run that reaches it teaches the
    /// hypervisor where it goes and the next translation goes on there.
    open: bool,
}

/// What exploration records of one region.
struct Explorer<'a> {
    src: &'a mut dyn CodeSource,
    bitness: Bitness,
    policy: &'a ExitPolicy,
    config: &'a TranslatorConfig,
    /// Decoded addresses, or why an address cannot be in a region.
    decoded: BTreeMap<u64, Result<Decoded, NoCluster>>,
    contexts: Vec<Context>,
    context_ids: BTreeMap<Context, usize>,
    nodes: Vec<Node>,
    node_ids: BTreeMap<(u64, usize), usize>,
    /// Distinct instruction addresses held, with their lengths: the code budget.
    spans: BTreeMap<u64, u8>,
    bytes: usize,
    /// The runs of back-to-back held instructions, start -> end: the code ranges
    /// the region needs (kept merged, so counting them costs nothing).
    runs: BTreeMap<u64, u64>,
    /// The first reason a path stopped growing, in exploration order.
    stop: Option<NoCluster>,
    /// The registers at the entry's exit, for a run-time translation
    /// ([`CodeSource::entry_registers`]).
    entry_regs: Option<[u64; 16]>,
}

impl Explorer<'_> {
    fn note_stop(&mut self, why: NoCluster) {
        self.stop.get_or_insert(why);
    }

    fn decode(&mut self, rip: u64) -> Result<Decoded, NoCluster> {
        if let Some(d) = self.decoded.get(&rip) {
            return *d;
        }
        let d = self.decode_uncached(rip);
        self.decoded.insert(rip, d);
        d
    }

    fn decode_uncached(&mut self, rip: u64) -> Result<Decoded, NoCluster> {
        // Bytes that run out or do not decode both end the code we can translate.
        let instr = decode_at(self.src, rip, self.bitness).ok_or(NoCluster::CodeEnds)?;
        let op = lower(&instr).map_err(|u| NoCluster::Unsupported(u.mnemonic()))?;
        Ok(Decoded {
            len: instr.len() as u8,
            op,
            exit_class: self.policy.classify(&instr),
        })
    }

    fn context(&mut self, ctx: Context) -> usize {
        if let Some(&id) = self.context_ids.get(&ctx) {
            return id;
        }
        let id = self.contexts.len();
        self.contexts.push(ctx.clone());
        self.context_ids.insert(ctx, id);
        id
    }

    /// Whether the instruction at `rip` (`len` bytes) fits the region's code budget:
    /// its bytes and the number of separate code ranges.
    fn fits(&self, rip: u64, len: u8) -> bool {
        if self.spans.contains_key(&rip) {
            return true;
        }
        let max_bytes = self.config.max_region_bytes.min(limits::MAX_CLUSTER_BYTES);
        if self.bytes + usize::from(len) > max_bytes {
            return false;
        }
        // A new address adds a code range unless it touches a held run.
        let end = rip + u64::from(len);
        self.touching_runs(rip, end).next().is_some()
            || self.runs.len() < self.config.max_code_ranges.min(limits::MAX_CODE_RANGES)
    }

    /// The held runs that `[rip, end]` overlaps or touches, by start.
    fn touching_runs(&self, rip: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let before = self
            .runs
            .range(..rip)
            .next_back()
            .filter(|&(_, &e)| e >= rip);
        before
            .into_iter()
            .chain(self.runs.range(rip..=end))
            .map(|(&a, &e)| (a, e))
    }

    /// Holds the instruction at `rip` (`len` bytes) in the code budget.
    fn hold(&mut self, rip: u64, len: u8) {
        if self.spans.insert(rip, len).is_some() {
            return;
        }
        self.bytes += usize::from(len);
        let (mut lo, mut hi) = (rip, rip + u64::from(len));
        let touched: Vec<(u64, u64)> = self.touching_runs(lo, hi).collect();
        for (a, e) in touched {
            self.runs.remove(&a);
            lo = lo.min(a);
            hi = hi.max(e);
        }
        self.runs.insert(lo, hi);
    }

    /// The node for `rip` in context `ctx` reached with `since` (what the path
    /// carries before it), creating or improving it; `None` when a rule stops the
    /// path before it. The bool says whether the node must be (re)explored.
    fn reach(&mut self, rip: u64, ctx: usize, since: &Gap) -> Option<(usize, bool)> {
        if let Some(&id) = self.node_ids.get(&(rip, ctx)) {
            // Already in the region: an edge to it costs nothing. Explore on from
            // it again only if this way is shorter.
            let node = &self.nodes[id];
            let after = if node.dec.exit_class.is_some() {
                since.after_exit(&node.dec.op)
            } else {
                since.then(&node.dec.op, self.entry_regs.as_ref())
            };
            let better = after.better_than(&node.since);
            if better {
                self.nodes[id].since = after;
            }
            return Some((id, better));
        }
        if since.insns >= self.config.look_ahead {
            self.note_stop(NoCluster::Single);
            return None;
        }
        let dec = match self.decode(rip) {
            Ok(d) => d,
            Err(why) => {
                self.note_stop(why);
                return None;
            }
        };
        let after = if dec.exit_class.is_some() {
            since.after_exit(&dec.op)
        } else {
            let gap = since.then(&dec.op, self.entry_regs.as_ref());
            if gap.page_count() > self.config.max_gap_memory_accesses as usize {
                self.note_stop(NoCluster::GapTooManyMemoryAccesses);
                return None;
            }
            gap
        };
        let max_nodes = self
            .config
            .max_cluster_insns
            .clamp(1, limits::MAX_CLUSTER_INSNS);
        if self.nodes.len() >= max_nodes || !self.fits(rip, dec.len) {
            self.note_stop(NoCluster::RegionFull);
            return None;
        }
        self.hold(rip, dec.len);
        let id = self.nodes.len();
        self.nodes.push(Node {
            rip,
            ctx,
            dec,
            since: after,
            edges: Vec::new(),
            open: false,
        });
        self.node_ids.insert((rip, ctx), id);
        Some((id, true))
    }

    /// The successors of node `id` as (address, context, how the edge is guarded).
    fn successors(&mut self, id: usize) -> Vec<(u64, usize, Option<u64>, bool)> {
        let node = &self.nodes[id];
        let (rip, ctx, op) = (node.rip, node.ctx, node.dec.op);
        let next = rip + u64::from(node.dec.len);
        let site = self.site_of(rip, ctx, &op);
        let mut out = Vec::new();
        if ends_cluster(&op, self.config) {
            self.note_stop(NoCluster::EndsCluster);
            return out;
        }
        if op.falls_through() {
            out.push((next, ctx, None, true));
        }
        match op {
            Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => {
                if let Target::Exit(t) = target {
                    let into = match (op, self.src.thunk(t)) {
                        (Op::Jmp { .. }, Some(_)) => self.via_context(ctx, Some(rip)),
                        _ => ctx,
                    };
                    out.push((t, into, None, false));
                }
            }
            Op::Call {
                target: Target::Exit(callee),
                ret,
                ..
            } => {
                if let Some(inner) = self.call_context(ctx, callee, ret) {
                    let via = self.src.thunk(callee).map(|_| rip);
                    let inner = self.via_context(inner, via);
                    out.push((callee, inner, None, false));
                }
            }
            Op::CallIndirect { ret, .. } => {
                let known = self.src.indirect_targets(site).to_vec();
                if known.is_empty() {
                    self.open(id);
                }
                for callee in known {
                    if let Some(inner) = self.call_context(ctx, callee, ret) {
                        out.push((callee, inner, Some(callee), false));
                    }
                }
            }
            Op::JmpIndirect { .. } => {
                let known = self.src.indirect_targets(site).to_vec();
                if known.is_empty() {
                    self.open(id);
                }
                let out_of_thunk = self.via_context(ctx, None);
                for t in known {
                    out.push((t, out_of_thunk, Some(t), false));
                }
            }
            Op::Ret { .. } => {
                let mut outer = self.contexts[ctx].clone();
                outer.via = None;
                match outer.frames.pop() {
                    // Returning from a call the region made: to its return address.
                    Some(f) if f.thunk_site.is_none() => {
                        let outer = self.context(outer);
                        out.push((f.ret, outer, Some(f.ret), false));
                    }
                    // The RET of a retpoline (to where the site that entered the
                    // thunk goes, in the context of that site's call), or of the
                    // function the region was entered in (to the return addresses
                    // seen or resolved for it).
                    _ => {
                        let known = self.src.indirect_targets(site).to_vec();
                        if known.is_empty() {
                            self.open(id);
                        }
                        let outer = self.context(outer);
                        for t in known {
                            out.push((t, outer, Some(t), false));
                        }
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Where the destinations of the instruction at `rip` in context `ctx` are known
    /// and learned: the site that entered the thunk it is in (for a retpoline's RET,
    /// the site whose call the retpoline's inner call stands in), else its own
    /// address.
    fn site_of(&self, rip: u64, ctx: usize, op: &Op) -> u64 {
        let c = &self.contexts[ctx];
        let retpoline = match (op, c.frames.last()) {
            (Op::Ret { .. }, Some(f)) => f.thunk_site,
            _ => None,
        };
        retpoline.or(c.via).unwrap_or(rip)
    }

    /// Context `ctx` with `via` as the site a thunk was entered from.
    fn via_context(&mut self, ctx: usize, via: Option<u64>) -> usize {
        if self.contexts[ctx].via == via {
            return ctx;
        }
        let mut c = self.contexts[ctx].clone();
        c.via = via;
        self.context(c)
    }

    /// Node `id` is a guarded instruction whose destinations are not known.
    fn open(&mut self, id: usize) {
        self.nodes[id].open = true;
        self.note_stop(NoCluster::IndirectUnknown);
    }

    /// The context inside a call from context `ctx` to `callee` returning to `ret`,
    /// or `None` past the depth limit or for recursion (the callee is already being
    /// run by an outer call of the region).
    fn call_context(&mut self, ctx: usize, callee: u64, ret: u64) -> Option<usize> {
        let outer = &self.contexts[ctx];
        // A call made inside a thunk (the retpoline's `call 1f`, popped by its own
        // RET a few instructions on) is no level of the guest's call chain: it
        // does not count against the depth, only against twice it.
        let depth = outer
            .frames
            .iter()
            .filter(|f| f.thunk_site.is_none())
            .count();
        let limit = self.config.max_call_depth;
        let too_deep = if outer.via.is_some() {
            outer.frames.len() >= 2 * limit
        } else {
            depth >= limit
        };
        if too_deep || outer.frames.iter().any(|f| f.callee == callee) {
            self.note_stop(NoCluster::CallDepth);
            return None;
        }
        let mut inner = outer.clone();
        inner.frames.push(Frame {
            callee,
            ret,
            thunk_site: outer.via,
        });
        inner.via = None;
        Some(self.context(inner))
    }

    /// Breadth-first exploration from the entry node.
    fn explore(&mut self, entry: usize) {
        let edge = |guard: Option<u64>, fall: bool, to: usize| match (guard, fall) {
            (Some(expect), _) => Edge::Guarded { expect, node: to },
            (None, true) => Edge::Fall(to),
            (None, false) => Edge::Direct(to),
        };
        // Edges a rule stopped (the region was full, say) to a place the region
        // took in later by another way: they go there too.
        let mut refused = Vec::new();
        let mut queue = VecDeque::from([entry]);
        while let Some(id) = queue.pop_front() {
            let since = self.nodes[id].since.clone();
            let succs = self.successors(id);
            let mut edges = Vec::with_capacity(succs.len());
            for (rip, ctx, guard, fall) in succs {
                let Some((to, again)) = self.reach(rip, ctx, &since) else {
                    refused.push((id, rip, ctx, guard, fall));
                    continue;
                };
                edges.push(edge(guard, fall, to));
                if again {
                    queue.push_back(to);
                }
            }
            self.nodes[id].edges = edges;
        }
        for (id, rip, ctx, guard, fall) in refused {
            if let Some(&to) = self.node_ids.get(&(rip, ctx)) {
                self.nodes[id].edges.push(edge(guard, fall, to));
            }
        }
    }
}

fn edge_node(e: &Edge) -> usize {
    match *e {
        Edge::Fall(n) | Edge::Direct(n) | Edge::Guarded { node: n, .. } => n,
    }
}

/// Build the region entered at `rip` (already checked to be exiting, lowered and not
/// a cluster end by the caller).
pub(super) fn build(
    src: &mut dyn CodeSource,
    rip: u64,
    bitness: Bitness,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Translated, NoCluster> {
    let entry_regs = src.entry_registers();
    let mut x = Explorer {
        src,
        bitness,
        policy,
        config,
        decoded: BTreeMap::new(),
        contexts: Vec::new(),
        context_ids: BTreeMap::new(),
        nodes: Vec::new(),
        node_ids: BTreeMap::new(),
        spans: BTreeMap::new(),
        bytes: 0,
        runs: BTreeMap::new(),
        stop: None,
        entry_regs,
    };
    let root = x.context(Context::default());
    let entry = match x.reach(rip, root, &Gap::EXIT) {
        Some((id, _)) => id,
        None => return Err(x.stop.unwrap_or(NoCluster::Undecodable)),
    };
    x.explore(entry);
    let stop = x.stop.unwrap_or(NoCluster::Single);

    let keep = useful(&x.nodes);
    let exiting = (0..x.nodes.len())
        .filter(|&n| keep[n] && x.nodes[n].dec.exit_class.is_some())
        .count();
    let kept = keep.iter().filter(|&&k| k).count();
    if exiting < 2 && kept < 2 && !x.nodes[entry].edges.iter().any(|e| edge_node(e) == entry) {
        return Err(stop);
    }
    let open = (0..x.nodes.len()).any(|n| keep[n] && x.nodes[n].open);
    // With a loop head before the entry if one fits, else without: the layout
    // must give the IR a valid cluster that still has something to gain (a cut
    // fall-through can break the only way round a loop).
    for with_head in [true, false] {
        let order = layout(&x.nodes, &keep, entry, with_head);
        let cluster = assemble(&mut x, &order, config)?;
        // An open guarded instruction gains once its destination is learned.
        let gains = cluster.exiting_count() >= 2 || !cluster.back_edges.is_empty() || open;
        if gains && crate::ir::validate(&cluster).is_ok() {
            return Ok(Translated {
                cluster,
                grows_no_further: stop,
            });
        }
    }
    Err(stop)
}

/// Nodes from which an exiting instruction, or an open guarded instruction, can be
/// reached (those included): the rest is a tail that gains nothing and is left to
/// run natively.
fn useful(nodes: &[Node]) -> Vec<bool> {
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (n, node) in nodes.iter().enumerate() {
        for e in &node.edges {
            preds[edge_node(e)].push(n);
        }
    }
    let mut keep = vec![false; nodes.len()];
    let mut stack: Vec<usize> = (0..nodes.len())
        .filter(|&n| nodes[n].dec.exit_class.is_some() || nodes[n].open)
        .collect();
    for &n in &stack {
        keep[n] = true;
    }
    while let Some(n) = stack.pop() {
        for &p in &preds[n] {
            if !keep[p] {
                keep[p] = true;
                stack.push(p);
            }
        }
    }
    keep
}

/// The engine's order. Instructions that fall through to each other form chains,
/// laid out whole so that each falls through to the next index. The entry's chain
/// comes first; what falls into the entry from before it (a loop head reached by a
/// back-edge) goes before it when the IR allows a loop head there (at most
/// [`limits::MAX_LOOP_HEAD_INSNS`] gap fillers that fall through), else it ends
/// its run at the entry's address. The other chains follow in depth-first order
/// from the entry, so that a callee follows its call site.
fn layout(nodes: &[Node], keep: &[bool], entry: usize, with_head: bool) -> Vec<usize> {
    let n = nodes.len();
    // fall[a] = b: kept `a` falls through to kept `b` (one predecessor each; code
    // decoded at two overlapping offsets may give a second one, which ends its run).
    let mut fall = vec![usize::MAX; n];
    let mut fall_pred = vec![usize::MAX; n];
    for a in (0..n).filter(|&a| keep[a]) {
        let next = nodes[a].edges.iter().find_map(|e| match *e {
            Edge::Fall(b) if keep[b] => Some(b),
            _ => None,
        });
        if let Some(b) = next {
            if fall_pred[b] == usize::MAX {
                fall[a] = b;
                fall_pred[b] = a;
            }
        }
    }
    // The loop head before the entry: plain gap fillers falling into it.
    let mut head = Vec::new();
    let mut p = fall_pred[entry];
    while with_head && p != usize::MAX && head.len() < limits::MAX_LOOP_HEAD_INSNS {
        let d = &nodes[p].dec;
        if d.exit_class.is_some() || !d.op.falls_through() || matches!(d.op, Op::Loop { .. }) {
            break;
        }
        head.push(p);
        p = fall_pred[p];
    }
    head.reverse();
    let first = head.first().copied().unwrap_or(entry);
    // Cut the chain before the head (or before the entry if there is none).
    if let Some(&before) = fall_pred.get(first).filter(|&&b| b != usize::MAX) {
        fall[before] = usize::MAX;
        fall_pred[first] = usize::MAX;
    }

    let mut placed = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut stack = vec![first];
    while let Some(m) = stack.pop() {
        if placed[m] {
            continue;
        }
        // Back to the head of `m`'s chain, then the whole chain.
        let mut h = m;
        while fall_pred[h] != usize::MAX && !placed[fall_pred[h]] {
            h = fall_pred[h];
        }
        let from = order.len();
        let mut c = h;
        while c != usize::MAX && !placed[c] {
            placed[c] = true;
            order.push(c);
            c = fall[c];
        }
        for &c in order[from..].iter().rev() {
            for e in nodes[c].edges.iter().rev() {
                let t = edge_node(e);
                if keep[t] && !placed[t] {
                    stack.push(t);
                }
            }
        }
    }
    order
}

/// Turn the laid-out nodes into the IR: resolve targets and guards, record
/// back-edges with their caps, collect the code ranges.
fn assemble(
    x: &mut Explorer<'_>,
    order: &[usize],
    config: &TranslatorConfig,
) -> Result<Cluster, NoCluster> {
    let mut index = vec![usize::MAX; x.nodes.len()];
    for (i, &n) in order.iter().enumerate() {
        index[n] = i;
    }
    let slot = |n: usize| (index[n] != usize::MAX).then(|| index[n] as u16);
    let mut insns = Vec::with_capacity(order.len());
    let mut guards = Vec::new();
    let mut learn_sites = Vec::new();
    for &n in order {
        let node = &x.nodes[n];
        let mut op = node.dec.op;
        let direct = node.edges.iter().find_map(|e| match *e {
            Edge::Direct(m) => Some(m),
            _ => None,
        });
        if let (Some(target), Some(m)) = (op.target_mut(), direct) {
            if let Some(i) = slot(m) {
                *target = Target::Insn(i);
            }
        }
        if op.is_guarded() {
            let at = insns.len() as u16;
            // Inside a thunk, destinations are the entering site's.
            let site = x.site_of(node.rip, node.ctx, &op);
            if site != node.rip {
                learn_sites.push(LearnSite { insn: at, site });
            }
            let mut seen: Vec<u64> = Vec::new();
            for e in &node.edges {
                if let Edge::Guarded { expect, node: m } = *e {
                    seen.push(expect);
                    let target = slot(m).map_or(Target::Exit(expect), Target::Insn);
                    guards.push(Guard {
                        insn: at,
                        expect,
                        target,
                    });
                }
            }
            // A return to the caller the region called from: completing it and
            // leaving there is what the CPU would do (the continuation gained
            // nothing, so it was left out).
            if let (
                Op::Ret { .. },
                Some(&Frame {
                    ret,
                    thunk_site: None,
                    ..
                }),
            ) = (op, x.contexts[node.ctx].frames.last())
            {
                if !seen.contains(&ret) {
                    guards.push(Guard {
                        insn: at,
                        expect: ret,
                        target: Target::Exit(ret),
                    });
                }
            }
        }
        insns.push(Insn {
            rip: node.rip,
            len: node.dec.len,
            op,
            exit_class: node.dec.exit_class,
        });
    }
    let back_edges = back_edges(&insns, &guards, config);
    if back_edges.len() > limits::MAX_BACK_EDGES || guards.len() > limits::MAX_GUARDS {
        return Err(NoCluster::RegionFull);
    }
    let code = code_ranges(x, &insns)?;
    Ok(Cluster {
        bitness: x.bitness,
        code,
        insns,
        back_edges,
        guards,
        learn_sites,
    })
}

/// One back-edge record per instruction with a target at or before itself; uncapped
/// when its loop qualifies ([`loop_qualifies`]) for every such target.
fn back_edges(insns: &[Insn], guards: &[Guard], config: &TranslatorConfig) -> Vec<BackEdge> {
    let mut out = Vec::new();
    for i in 0..insns.len() {
        let back: Vec<usize> = successors(insns, guards, i)
            .into_iter()
            .filter(|&t| t <= i)
            .collect();
        if back.is_empty() {
            continue;
        }
        let qualifies = back.iter().all(|&t| loop_qualifies(insns, guards, t, i));
        out.push(BackEdge {
            insn: i as u16,
            cap: (!qualifies).then_some(config.back_edge_cap),
        });
    }
    out
}

/// Whether the back-edge from `branch` to `target` may run uncapped: every way from
/// `target` back to `branch` inside the cluster passes an exiting instruction, so
/// each time the back-edge is taken and the cluster goes on, an iteration does the
/// work of an exit before it can come round again (the engine also checks for
/// interrupts at every back-edge). A branch out of the cluster ends the run, so it
/// does not count.
pub fn loop_qualifies(insns: &[Insn], guards: &[Guard], target: usize, branch: usize) -> bool {
    if target >= insns.len() || branch >= insns.len() {
        return false;
    }
    let mut seen = vec![false; insns.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if seen[i] || insns[i].exit_class.is_some() {
            continue;
        }
        if i == branch {
            return false;
        }
        seen[i] = true;
        stack.extend(successors(insns, guards, i));
    }
    true
}

/// The code ranges of the laid-out instructions: their bytes, merged where they
/// touch, read once more from the source.
fn code_ranges(x: &mut Explorer<'_>, insns: &[Insn]) -> Result<Vec<CodeRange>, NoCluster> {
    let mut spans: Vec<(u64, u64)> = insns
        .iter()
        .map(|i| (i.rip, i.rip + u64::from(i.len)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    if merged.len() > limits::MAX_CODE_RANGES {
        return Err(NoCluster::RegionFull);
    }
    let mut code = Vec::with_capacity(merged.len());
    for (a, b) in merged {
        let mut bytes = vec![0u8; (b - a) as usize];
        if x.src.read(a, &mut bytes) != bytes.len() {
            return Err(NoCluster::CodeEnds);
        }
        code.push(CodeRange { start: a, bytes });
    }
    Ok(code)
}
