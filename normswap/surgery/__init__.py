"""Weight surgery: centring residual writers, folding affines, swapping norm modules."""
