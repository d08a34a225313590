"""Learn: prune a CNN and a ViT trained on real digits and see what each criterion costs."""
import streamlit as st

from explorer.teach import learn

st.title("Learn: pruning on real data")
st.markdown(
    "Two small models are trained on scikit-learn's **8x8 handwritten digits** (1,797 images, "
    "a fixed 75/25 split): a CNN and a vision transformer. Copies are then pruned with each "
    "importance criterion at ratios 10-70 %, tested, fine-tuned for a moment and tested again. "
    "Everything is seeded; results are cached on disk, so the second visit is instant.")

c = st.columns(3)
dino = c[0].toggle("Add a ViT with DINO's attention", key="learn_dino",
                   help="Its forward recomputes the head size as C // num_heads.")
tune = c[1].selectbox("Fine-tune epochs", (0, 1, 2, 3), index=2, key="learn_tune")
models = ("cnn", "vit", "vit-dino") if dino else ("cnn", "vit")
settings = learn.LearnSettings(models=models, finetune_epochs=tune)

if c[2].button("Run the experiment", key="learn_run", type="primary"):
    bar = st.progress(0.0, text="starting")
    try:
        st.session_state.learn_result = learn.run(
            settings, progress=lambda f, t: bar.progress(f, text=t), threads=None)
    except Exception as exc:  # noqa: BLE001 - shown as one line, never a traceback
        st.error(f"The experiment failed: {exc}")
        st.stop()
    bar.empty()

result = st.session_state.get("learn_result")
if result is None or result.settings != settings:
    result = learn.load_cached(settings)
if result is None:
    st.info("Press **Run the experiment**: about a minute or two on two CPU cores, "
            "then cached for these settings.")
    st.stop()

names = [m.model for m in result.models]
model = st.radio("Model", names, horizontal=True, key="learn_model")
base = next(m for m in result.models if m.model == model)
m = st.columns(4)
m[0].metric("test accuracy (unpruned)", f"{base.accuracy:.1%}")
m[1].metric("parameters", f"{base.params:,}")
m[2].metric("MACs per image", f"{base.macs:,}")
m[3].metric("training time", f"{base.train_seconds:.1f} s")

st.subheader("Accuracy against ratio")
left, right = st.columns([3, 1])
left.plotly_chart(learn.accuracy_figure(result, model, "ratio", finetuned=tune > 0),
                  key="learn_acc_ratio", width="stretch")
right.markdown(
    "**Random is the baseline to beat.** A criterion that scores channels no better than "
    "chance is not worth its cost. The gap between a solid line and the grey one is what "
    "the criterion knows; the dashed lines show how much a short fine-tune gives back, "
    "which is often more than the choice of criterion.")

st.subheader("Accuracy against model size")
axis = st.radio("x axis", ("params", "macs"), horizontal=True, key="learn_x")
left, right = st.columns([3, 1])
left.plotly_chart(learn.accuracy_figure(result, model, axis, finetuned=tune > 0),
                  key="learn_acc_size", width="stretch")
right.markdown(
    "A ratio of 50 % does **not** halve the parameters: a layer between two pruned groups "
    "loses rows *and* columns, so it shrinks to about a quarter. Read size from this plot, "
    "not from the ratio.")

st.subheader("Which groups are sensitive?")
left, right = st.columns([3, 1])
left.plotly_chart(learn.learn_sensitivity_figure(result, model), key="learn_sens", width="stretch")
right.markdown(
    "A **coupled group** is a set of channels that must be cut together: removing output "
    "channel *i* of a conv also removes input channel *i* of the next conv and entry *i* of "
    "the BatchNorm between them. In a ViT the residual stream couples every block. Each "
    "line prunes one group alone; steep lines mark groups to prune gently.")

st.subheader("The groups of this model")
st.dataframe([{"group": g.id, "label": g.label, "channels": g.channels, "heads": g.heads,
               "prunable": g.prunable, "why not": g.reason, "members": ", ".join(g.members)}
              for g in base.groups], key="learn_groups", hide_index=True, width="stretch")
st.markdown(
    "**Why heads must stay divisible.** Attention reshapes the qkv output into "
    "`(3, heads, head_dim)`. Pruning removes the same dims from every head (or whole heads), "
    "so `heads x head_dim` always factors. DINO's own code recomputes `head_dim = C // heads` "
    "from the stream width `C`: it only runs if the stream and the head dims shrink in step "
    "(48 -> 36 with 16 -> 12 works; 48 -> 32 with 16 -> 11 does not). The explorer pre-flights "
    "every group and reports the failing line instead of crashing.")
unsafe = [p for p in result.points if p.model == model and p.unsafe]
if unsafe:
    st.warning(f"{len(unsafe)} runs left groups unpruned because the model code broke, e.g. "
               f"{unsafe[0].unsafe[0]}")
