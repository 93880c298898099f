"""Pattern -> plan -> tile lists -> generated Triton module.

- `plan.build_plan`: per branch and head-offset group, which tiles are computed (dilated branches
  in dilated coordinates), built analytically; `tiles` holds the tile-set shapes.
- `layouts`: exports for comparison and interop (FlexAttention, DeepSpeed-style 0/1 layouts,
  the tiles a block-sparse kernel over original positions would compute).
- `codegen`: renders templates/*.jinja into one module per pattern; `files` writes it
  atomically (and cleans killed writers' temporary files); `names` checks its import name.
"""
