//! Which kernel covers a row of a row-wise op (softmax, log_softmax, the losses) within the
//! loop bound (`gpu::shared::MAX_LOOP_ITERATIONS`): one invocation per row reads the row
//! `passes` times; past that, one workgroup per row (`shaders/rows.wgsl`'s trees) reads
//! `len / WORKGROUP` per lane `passes` times; past that, the op refuses the shape.

use crate::error::{Error, Result};
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, WORKGROUP};

/// How a row-wise op's kernel covers one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowKernel {
    /// One invocation per row.
    PerInvocation,
    /// One workgroup per row, its lanes striding over it.
    PerWorkgroup,
}

/// The kernel for rows of `len` elements that the op reads `passes` times.
pub(crate) fn row_kernel(op: &'static str, len: usize, passes: usize) -> Result<RowKernel> {
    // Each tree of rows.wgsl loops log2(WORKGROUP) times; a pass adds up at most one.
    let tree = WORKGROUP.ilog2() as usize;
    if passes * len + tree <= MAX_LOOP_ITERATIONS {
        Ok(RowKernel::PerInvocation)
    } else if passes * (len.div_ceil(WORKGROUP as usize) + tree) <= MAX_LOOP_ITERATIONS {
        Ok(RowKernel::PerWorkgroup)
    } else {
        let most = (MAX_LOOP_ITERATIONS / passes - tree) * WORKGROUP as usize;
        Err(Error::InvalidArgument {
            op,
            detail: format!(
                "rows of {len} elements; this op takes at most {most} (each invocation's \
                 loops are bounded, see ARCHITECTURE.md's loop bound)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_switch_to_workgroups_then_to_an_error_at_the_bound() {
        assert_eq!(row_kernel("t", 5_458, 3).unwrap(), RowKernel::PerInvocation);
        assert_eq!(row_kernel("t", 5_459, 3).unwrap(), RowKernel::PerWorkgroup);
        assert_eq!(
            row_kernel("t", 1_395_968, 3).unwrap(),
            RowKernel::PerWorkgroup
        );
        let err = row_kernel("t", 1_395_969, 3).unwrap_err().to_string();
        assert!(err.contains("at most 1395968"), "{err}");
    }
}
