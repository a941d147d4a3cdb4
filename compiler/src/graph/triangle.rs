//! Triangular matrix products: a matmul may read one operand, or keep its result, as a
//! triangular matrix (the other elements taken as zero). Causal attention's products are such:
//! the scores are needed on and below the diagonal only, the probabilities are zero above it,
//! and so are their gradients. Said in the graph, a backend can skip the blocks that are all
//! zeros, about half of each product; one that ignores it must still zero what the triangle
//! leaves out.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which elements of a matrix (its last two axes) a triangle keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Triangle {
    /// `(row, col)` with `col <= row`: on and below the diagonal (`tril`).
    Lower,
    /// `(row, col)` with `col >= row`: on and above the diagonal (`triu`).
    Upper,
}

impl Triangle {
    /// Whether the triangle keeps element `(row, col)`.
    pub fn keeps(self, row: usize, col: usize) -> bool {
        match self {
            Triangle::Lower => col <= row,
            Triangle::Upper => col >= row,
        }
    }

    /// The triangle of the transposed matrix: `tril(X)ᵀ = triu(Xᵀ)`.
    pub fn transposed(self) -> Self {
        match self {
            Triangle::Lower => Triangle::Upper,
            Triangle::Upper => Triangle::Lower,
        }
    }
}

/// The part of a product `C = A·B` a triangle applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatMulPart {
    /// `C = T(A)·B`.
    Left,
    /// `C = A·T(B)`.
    Right,
    /// `C = T(A·B)`.
    Output,
}

/// A matmul's triangular part: `part` read (or, for the output, kept) as `triangle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Triangular {
    pub part: MatMulPart,
    pub triangle: Triangle,
}

impl Triangular {
    pub fn new(part: MatMulPart, triangle: Triangle) -> Self {
        Triangular { part, triangle }
    }

    /// The same product transposed, `Cᵀ = Bᵀ·Aᵀ`: the operands trade places and each
    /// triangle is transposed.
    pub fn transposed(self) -> Self {
        let part = match self.part {
            MatMulPart::Left => MatMulPart::Right,
            MatMulPart::Right => MatMulPart::Left,
            MatMulPart::Output => MatMulPart::Output,
        };
        Triangular::new(part, self.triangle.transposed())
    }

    /// The triangles of the two gradient products, `dA = dC·Bᵀ` and `dB = Aᵀ·dC`. For
    /// `C = T(A·B)`: `dA = T(dC)·Bᵀ`, `dB = Aᵀ·T(dC)`. For `C = T(A)·B`: `dA = T(dC·Bᵀ)`,
    /// `dB = T(A)ᵀ·dC = Tᵀ(Aᵀ)·dC`. For `C = A·T(B)`: `dA = dC·Tᵀ(Bᵀ)`, `dB = T(Aᵀ·dC)`.
    pub fn gradients(self) -> (Triangular, Triangular) {
        use MatMulPart::{Left, Output, Right};
        let t = self.triangle;
        match self.part {
            Output => (Triangular::new(Left, t), Triangular::new(Right, t)),
            Left => (
                Triangular::new(Output, t),
                Triangular::new(Left, t.transposed()),
            ),
            Right => (
                Triangular::new(Right, t.transposed()),
                Triangular::new(Output, t),
            ),
        }
    }
}

/// As printed in a matmul's attributes: `a lower`, `out upper`.
impl fmt::Display for Triangular {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = match self.part {
            MatMulPart::Left => "a",
            MatMulPart::Right => "b",
            MatMulPart::Output => "out",
        };
        let triangle = match self.triangle {
            Triangle::Lower => "lower",
            Triangle::Upper => "upper",
        };
        write!(f, "{part} {triangle}")
    }
}

#[cfg(test)]
mod tests {
    use super::{MatMulPart, Triangle, Triangular};

    #[test]
    fn transposing_twice_and_the_gradient_rules_are_consistent() {
        for part in [MatMulPart::Left, MatMulPart::Right, MatMulPart::Output] {
            for triangle in [Triangle::Lower, Triangle::Upper] {
                let t = Triangular::new(part, triangle);
                assert_eq!(t.transposed().transposed(), t);
                // The gradient of the transposed product is the transposed gradients, swapped.
                let (da, db) = t.gradients();
                let (dbt, dat) = t.transposed().gradients();
                assert_eq!((da.transposed(), db.transposed()), (dat, dbt), "{t}");
            }
        }
        assert!(Triangle::Lower.keeps(3, 2) && !Triangle::Lower.keeps(2, 3));
        assert!(Triangle::Upper.keeps(2, 3) && !Triangle::Upper.keeps(3, 2));
    }
}
