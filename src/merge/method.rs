//! The merge vocabulary, in one place: [`Method`] (mergekit's names), what each method does to
//! a tensor — its [`Sparsifier`], [`Rescale`] rule and [`Kind`] of combination — and the
//! resolved [`MethodSpec`] the engine runs. Config parsing, the engine, the kernels, delta
//! packs and the command line all use these types; nothing translates between synonyms.
//!
//! Following `dare_ties` from the command line to the kernel: the CLI parses the name with
//! [`Method::from_name`]; [`Method::spec`] gives [`Sparsifier::Random`] with sign consensus;
//! the engine hands the sparsifier to [`crate::merge::kernel::sparsify`], which draws the
//! Philox mask ([`crate::merge::mask`]).

use std::fmt;

/// A merge method, named as in mergekit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `linear`: weighted average of the models (no base).
    Linear,
    /// `task_arithmetic`: base + Σ weightᵢ·δᵢ.
    TaskArithmetic,
    /// `ties`: magnitude pruning (top-`density` of |δ|), sign election, disjoint merge.
    Ties,
    /// `dare_linear`: random drop (keep with probability `density`), rescale, sum.
    DareLinear,
    /// `dare_ties`: random drop, rescale, sign election.
    DareTies,
    /// `breadcrumbs`: drop the `gamma` largest and the smallest |δ| down to `density`.
    Breadcrumbs,
    /// `breadcrumbs_ties`: breadcrumbs pruning with sign election.
    BreadcrumbsTies,
    /// `della`: magnitude-ranked random drop (keep probabilities `density ± epsilon`), sign
    /// election.
    Della,
    /// `della_linear`: DELLA drop without sign election.
    DellaLinear,
    /// `slerp`: spherical interpolation between the base (`t = 0`) and one model (`t = 1`).
    Slerp,
}

/// How each model's delta is sparsified before combining (mergekit's
/// `SparsificationMethod`, plus "none"). Also what a delta pack was extracted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sparsifier {
    /// Keep every element.
    None,
    /// DARE: keep each element with probability `density` (Philox mask).
    Random,
    /// TIES: keep the top `density` fraction by magnitude.
    Magnitude,
    /// Model Breadcrumbs: drop the top `gamma` fraction, keep the next `density` fraction.
    Outliers,
    /// DELLA's MagPrune: keep with probability rising with the magnitude rank within the row,
    /// from `density − epsilon` to `density + epsilon`.
    Della,
}

/// How kept deltas are rescaled after DARE/DELLA-style dropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rescale {
    /// Divide kept deltas by the keep probability (`density`), as in the DARE paper: the
    /// expectation of every element is preserved. The native default.
    Inverse,
    /// Scale the kept deltas so that ‖δ‖₁ of the tensor is unchanged: what mergekit does for
    /// `rescale: true`.
    L1,
    /// No rescaling.
    None,
}

/// The shape of a merge's computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Weighted sum of the models themselves (no base).
    Linear,
    /// Spherical interpolation between the base and one model.
    Slerp,
    /// base + λ · combine(sparsify(model − base)).
    TaskVector,
}

/// A method, resolved with its settings: what the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodSpec {
    /// Shape of the computation.
    pub kind: Kind,
    /// Sparsifier of each delta.
    pub sparsifier: Sparsifier,
    /// TIES sign election.
    pub consensus: bool,
    /// Divide by the sum of (agreeing) weights.
    pub normalize: bool,
    /// Rescale rule.
    pub rescale: Rescale,
}

/// One row of the method table.
struct Row {
    method: Method,
    name: &'static str,
    kind: Kind,
    sparsifier: Sparsifier,
    consensus: bool,
    /// mergekit's registry default of `normalize`.
    normalize: bool,
    /// mergekit's registry default of `rescale`.
    rescale: bool,
}

/// Every method, in mergekit's registry order, with what it does.
const METHODS: [Row; 10] = {
    use Kind::*;
    use Method as M;
    use Sparsifier as S;
    #[rustfmt::skip]
    let rows = [
        // method               name                kind        sparsifier    consensus normalize rescale
        Row { method: M::Linear,          name: "linear",           kind: Linear,     sparsifier: S::None,      consensus: false, normalize: true,  rescale: false },
        Row { method: M::Slerp,           name: "slerp",            kind: Slerp,      sparsifier: S::None,      consensus: false, normalize: false, rescale: false },
        Row { method: M::TaskArithmetic,  name: "task_arithmetic",  kind: TaskVector, sparsifier: S::None,      consensus: false, normalize: false, rescale: false },
        Row { method: M::Ties,            name: "ties",             kind: TaskVector, sparsifier: S::Magnitude, consensus: true,  normalize: true,  rescale: false },
        Row { method: M::DareTies,        name: "dare_ties",        kind: TaskVector, sparsifier: S::Random,    consensus: true,  normalize: false, rescale: true  },
        Row { method: M::DareLinear,      name: "dare_linear",      kind: TaskVector, sparsifier: S::Random,    consensus: false, normalize: false, rescale: true  },
        Row { method: M::Breadcrumbs,     name: "breadcrumbs",      kind: TaskVector, sparsifier: S::Outliers,  consensus: false, normalize: false, rescale: false },
        Row { method: M::BreadcrumbsTies, name: "breadcrumbs_ties", kind: TaskVector, sparsifier: S::Outliers,  consensus: true,  normalize: false, rescale: false },
        Row { method: M::Della,           name: "della",            kind: TaskVector, sparsifier: S::Della,     consensus: true,  normalize: true,  rescale: true  },
        Row { method: M::DellaLinear,     name: "della_linear",     kind: TaskVector, sparsifier: S::Della,     consensus: false, normalize: false, rescale: true  },
    ];
    rows
};

impl Method {
    /// Every method, in mergekit's registry order.
    pub const ALL: [Method; 10] = [
        Method::Linear,
        Method::Slerp,
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareTies,
        Method::DareLinear,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Della,
        Method::DellaLinear,
    ];

    /// The methods that combine already-sparsified delta packs (`apply`, the runtime): those
    /// whose only per-model step, besides the weight, is DARE's (which a pack has done) or
    /// none, so a pack's kept values are all they need.
    pub const COMBINING_PACKS: [Method; 4] = [
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareTies,
        Method::DareLinear,
    ];

    fn row(self) -> &'static Row {
        // The table holds every method once (tested).
        METHODS
            .iter()
            .find(|r| r.method == self)
            .unwrap_or(&METHODS[0])
    }

    /// The method of a mergekit name (`"dare_ties"`), exact and lower-case as in mergekit.
    pub fn from_name(name: &str) -> Option<Method> {
        METHODS.iter().find(|r| r.name == name).map(|r| r.method)
    }

    /// The mergekit name, e.g. `"dare_ties"`.
    pub fn name(self) -> &'static str {
        self.row().name
    }

    /// The shape of its computation.
    pub fn kind(self) -> Kind {
        self.row().kind
    }

    /// How it sparsifies each delta.
    pub fn sparsifier(self) -> Sparsifier {
        self.row().sparsifier
    }

    /// Whether the method needs a base model: all but `linear`.
    pub fn needs_base(self) -> bool {
        self.kind() != Kind::Linear
    }

    /// Whether the method works on task vectors δ = model − base (mergekit's "generalized task
    /// arithmetic" family: all but `linear` and `slerp`).
    pub fn is_task_vector(self) -> bool {
        self.kind() == Kind::TaskVector
    }

    /// The default of `normalize`, as in mergekit's registry: true for `linear`, `ties` and
    /// `della`; false for the others.
    pub fn default_normalize(self) -> bool {
        self.row().normalize
    }

    /// The default of `rescale`, as in mergekit's registry: true for `dare_ties`,
    /// `dare_linear`, `della` and `della_linear`; false for the others.
    pub fn default_rescale(self) -> bool {
        self.row().rescale
    }

    /// Whether the method elects a sign per element and merges only agreeing deltas (the
    /// TIES family: `ties`, `dare_ties`, `breadcrumbs_ties`, `della`).
    pub fn uses_sign_consensus(self) -> bool {
        self.row().consensus
    }

    /// Whether the method can combine delta packs ([`Method::COMBINING_PACKS`]).
    pub fn combines_packs(self) -> bool {
        Method::COMBINING_PACKS.contains(&self)
    }

    /// The engine's view of the method with its `normalize` and `rescale` settings.
    pub fn spec(self, normalize: bool, rescale: Rescale) -> MethodSpec {
        let r = self.row();
        MethodSpec {
            kind: r.kind,
            sparsifier: r.sparsifier,
            consensus: r.consensus,
            normalize,
            rescale,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Sparsifier {
    /// Every sparsifier.
    pub const ALL: [Sparsifier; 5] = [
        Sparsifier::None,
        Sparsifier::Random,
        Sparsifier::Magnitude,
        Sparsifier::Outliers,
        Sparsifier::Della,
    ];

    /// The name (`none`, `dare`, `magnitude`, `breadcrumbs`, `della`): `extract --sparsify`
    /// and a pack's `delta.method`.
    pub fn name(self) -> &'static str {
        match self {
            Sparsifier::None => "none",
            Sparsifier::Random => "dare",
            Sparsifier::Magnitude => "magnitude",
            Sparsifier::Outliers => "breadcrumbs",
            Sparsifier::Della => "della",
        }
    }

    /// The sparsifier of a name.
    pub fn from_name(name: &str) -> Option<Sparsifier> {
        Sparsifier::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether the kept elements follow from (seed, stream, tensor, density) alone, so a pack
    /// need not store their indices (DARE's Philox mask).
    pub fn mask_is_regenerable(self) -> bool {
        self == Sparsifier::Random
    }
}

impl fmt::Display for Sparsifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Rescale {
    /// Every rule.
    pub const ALL: [Rescale; 3] = [Rescale::Inverse, Rescale::L1, Rescale::None];

    /// The native name: `"inverse"`, `"l1"` or `"none"`.
    pub fn name(self) -> &'static str {
        match self {
            Rescale::Inverse => "inverse",
            Rescale::L1 => "l1",
            Rescale::None => "none",
        }
    }

    /// The mode of a native name (`"inverse"`, `"l1"`, `"none"`).
    pub fn from_name(name: &str) -> Option<Rescale> {
        Rescale::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Rescale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_every_method_once_and_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(METHODS.iter().filter(|r| r.method == m).count(), 1, "{m:?}");
            assert_eq!(Method::from_name(m.name()), Some(m));
            assert_eq!(m.row().method, m);
        }
        for s in Sparsifier::ALL {
            assert_eq!(Sparsifier::from_name(s.name()), Some(s));
        }
        for r in Rescale::ALL {
            assert_eq!(Rescale::from_name(r.name()), Some(r));
        }
        assert_eq!(Method::from_name("DARE_TIES"), None);
    }

    #[test]
    fn sign_consensus_and_packs() {
        let consensus: Vec<_> = Method::ALL
            .into_iter()
            .filter(|m| m.uses_sign_consensus())
            .collect();
        assert_eq!(
            consensus,
            [
                Method::Ties,
                Method::DareTies,
                Method::BreadcrumbsTies,
                Method::Della
            ]
        );
        assert!(Method::COMBINING_PACKS.iter().all(|m| m.is_task_vector()));
    }
}
