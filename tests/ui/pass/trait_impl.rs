// Methods of a trait impl, with associated types and consts named through
// `Self::` in signatures and bodies.

pub trait Shape {
    type Unit;
    const SIDES: u32;
    fn area(&self) -> Self::Unit;
    fn sides(&self) -> u32;
    fn scaled(&self, by: Self::Unit) -> Self
    where
        Self: Sized;
    fn describe(&self) -> String {
        format!("{} sides", self.sides())
    }
}

#[derive(Debug, PartialEq)]
pub struct Square(pub u64);

#[hotpatch::patchable]
impl Shape for Square {
    type Unit = u64;
    const SIDES: u32 = 4;

    fn area(&self) -> Self::Unit {
        let side: Self::Unit = self.0;
        side * side
    }

    fn sides(&self) -> u32 {
        Self::SIDES
    }

    fn scaled(&self, by: Self::Unit) -> Self {
        Square(self.0 * by)
    }
}

#[hotpatch::patchable]
impl Square {
    pub fn perimeter(&self) -> u64 {
        self.0 * u64::from(<Self as Shape>::SIDES)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Meters(pub f64);

#[hotpatch::patchable]
impl std::ops::Add for Meters {
    type Output = Meters;

    fn add(self, other: Self) -> Self::Output {
        Meters(self.0 + other.0)
    }
}

#[hotpatch::patchable]
impl std::fmt::Display for Square {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "square({})", self.0)
    }
}

fn main() {
    let s = Square(3);
    assert_eq!(s.area(), 9);
    assert_eq!(s.sides(), 4);
    assert_eq!(s.scaled(2), Square(6));
    assert_eq!(s.describe(), "4 sides");
    assert_eq!(s.perimeter(), 12);
    assert_eq!(s.to_string(), "square(3)");
    assert_eq!((Meters(1.5) + Meters(2.0)).0, 3.5);

    let paths: Vec<_> = hotpatch::functions().into_iter().map(|f| f.path).collect();
    for name in ["as Shape>::area", "as Shape>::sides", "as Shape>::scaled"] {
        assert!(
            paths.iter().any(|p| p.ends_with(name)),
            "{name} not in {paths:?}"
        );
    }
    assert!(
        paths.iter().any(|p| p.ends_with("::Square::perimeter")),
        "{paths:?}"
    );
}
