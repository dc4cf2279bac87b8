"""Real photos on ImageNet models: class names, photo preparation, unnamed true classes and attack budgets.

Every photo is made here; no network and no weights are needed (architectures have random weights).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meansparse_core import attach
from meansparse_core.budget import BOOKKEEPING_S, Cost, measure
from meansparse_core.data import (CIFAR100_CLASSES, DATASETS, IMAGENET_PREPARATION, fit_image, imagenet_classes,
                                  load_image)
from meansparse_core.models import (bundled_statistics_path, find_model, fits_a_laptop, load_model,
                                    parameter_count, robustbench_models)
from meansparse_core.robustbench_compat import import_robustbench
from meansparse_core.statistics import Statistics
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.one_image import attack_image, compare

IMAGENET = (3, 224, 224)
R18 = "robustbench/imagenet/Linf/Salman2020Do_R18"


def photo_jpeg(width: int = 4000, height: int = 3000, orientation: int = 6) -> bytes:
    """A camera-style JPEG stored landscape, left half red and right half blue, with an EXIF
    orientation tag: 6 means "rotate 90 degrees clockwise to view", so upright it is portrait with
    red on top."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (220, 30, 30)
    array[:, width // 2:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_imagenet_class_names_ship_offline_in_robustbench_order():
    names = imagenet_classes()
    assert len(names) == 1000 == len(set(names))
    # RobustBench labels ImageNet by sorted WordNet id (its class map); torchvision's categories
    # follow the same order: n01440764 is the tench, n15075141 toilet tissue.
    import_robustbench()
    import robustbench

    class_map = json.loads((Path(robustbench.__file__).parent / "helper_files" / "imagenet_class_to_id_map.json")
                           .read_text())
    assert [class_map[w] for w in sorted(class_map)] == list(range(1000))
    assert sorted(class_map)[0] == "n01440764" and names[0] == "tench"
    assert sorted(class_map)[999] == "n15075141" and names[999] == "toilet tissue"
    assert find_model(R18).class_names == names and names[281] == "tabby"


def test_every_dataset_names_its_classes_without_loading_data():
    for key, source in DATASETS.items():
        assert len(source.class_names) == source.num_classes == len(set(source.class_names)), key
        assert not any(name.startswith("class ") for name in source.class_names), key
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES) and CIFAR100_CLASSES[0] == "apple"
    assert robustbench_models("cifar100", "Linf")[0].class_names[-1] == "worm"


def test_a_rotated_camera_photo_becomes_the_upright_centre_crop():
    image = load_image(photo_jpeg(), IMAGENET, preparation=IMAGENET_PREPARATION)
    assert image.shape == IMAGENET and 0 <= image.min() <= image.max() <= 1
    top, bottom = image[:, :20].mean(dim=(1, 2)), image[:, -20:].mean(dim=(1, 2))
    assert top[0] > 0.7 > 0.3 > top[2] and bottom[2] > 0.7 > 0.3 > bottom[0]  # red on top: the tag was honoured


def test_photos_are_prepared_as_robustbench_prepares_imagenet():
    import_robustbench()
    from robustbench.data import PREPROCESSINGS

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8))
    for name, preparation in [("Res256Crop224", IMAGENET_PREPARATION),
                              ("BicubicRes256Crop224", find_model(
                                  "robustbench/imagenet/Linf/Liu2023Comprehensive_ConvNeXt-L").preparation)]:
        assert torch.equal(fit_image(picture, IMAGENET, preparation), PREPROCESSINGS[name](picture)), name
    assert find_model(R18).preparation == IMAGENET_PREPARATION
    assert "resized to 256" in IMAGENET_PREPARATION.describe(IMAGENET)


def test_laptop_mark_follows_the_parameter_count():
    assert parameter_count(find_model(R18)) == 11_689_512 and fits_a_laptop(find_model(R18))
    assert fits_a_laptop(find_model("robustbench/imagenet/Linf/Salman2020Do_R50"))
    assert not fits_a_laptop(find_model("robustbench/imagenet/Linf/Salman2020Do_50_2"))  # 69M
    # built by timm with pretrained weights: never built just to be counted
    assert parameter_count(find_model("robustbench/imagenet/Linf/Debenedetti2022Light_XCiT-S12")) is None


@pytest.fixture(scope="module")
def digits_sparse():
    spec = find_model("bundled/digits-cnn")
    return attach(load_model(spec), Statistics.load(bundled_statistics_path(spec))), spec.class_names


def test_an_unnamed_photo_is_judged_against_the_base_prediction(digits_sparse):
    """An upload once defaulted to class 0, and the verdict then claimed both models were fooled."""
    sparse, names = digits_sparse
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    predicted = int(sparse.base(image[None]).argmax())
    choice = AttackChoice("pgd", eps=32, steps=5, target="base")
    adversarial = attack_image(sparse, image, None, choice)
    assert torch.equal(adversarial, attack_image(sparse, image, predicted, choice))
    unknown = compare(sparse, image, None, None, 0.2, names)
    assert unknown.label == names[predicted] and not unknown.label_known
    assert "true class unknown" in unknown.verdict and f"true class {names[0]}" not in unknown.verdict
    attacked = compare(sparse, image, image, None, 0.2, names)  # an "attack" that changed nothing
    assert "both models still see the base model's prediction" in attacked.verdict
    assert "True class unknown" in attacked.verdict and f"True class {names[0]}," not in attacked.verdict
    assert compare(sparse, image, image, predicted, 0.2, names).verdict.startswith(f"True class {names[predicted]}")


def test_attack_costs_are_stated_before_they_run(digits_sparse):
    cost = measure(digits_sparse[0].base, (1, 8, 8))
    assert cost.forward_s > 0 and cost.gradient_s > 0 and cost.device == "this CPU"
    assert cost.describe("pgd", 10).startswith("PGD-10 on this image: ") and cost.describe("pgd", 10).endswith(
        " on this CPU")
    slow = Cost(forward_s=0.1, gradient_s=0.3, parameters=25_557_032, device="this CPU")
    assert slow.describe("pgd", 10) == "PGD-10 on this image: about 3 s on this CPU"
    assert slow.warning("pgd", 10) is None
    warning = slow.warning("autoattack", 100)
    assert warning.startswith("AUTOATTACK on this image: up to about 20 min on this CPU") and "26M-parameter" in warning
    assert "about 15 min" in slow.warning("pgd", 10, images=300)
    assert slow.seconds("square", 1000) == pytest.approx(1002 * (0.1 + BOOKKEEPING_S))  # its queries, one before, one after


def test_imagenet_resnets_in_place_relus_take_exact_gradients_through_meansparse():
    """torchvision's ResNets apply ReLU(inplace=True) to the operator's output; the fused path used to
    return a view there, and the first attack step failed."""
    from meansparse_core.fusion import MIN_ELEMENTS
    from meansparse_core.operator import sparsify

    x = torch.randn(1, 16, 64, MIN_ELEMENTS // 1024, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mean, std = torch.zeros(16), torch.ones(16)
    y = torch.nn.ReLU(inplace=True)(sparsify(x, mean, std, 0.5))
    (gradient,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gradient, ((x.abs() >= 0.5) & (x > 0)).float())


# --- the app: a photo on a random-weight ImageNet ResNet-18 (Streamlit's AppTest) ---------------------------


def random_imagenet_weights(folder: Path, key: str = R18) -> torch.nn.Module:
    """The model with random weights, saved in RobustBench's layout under ``folder / "models"``."""
    from meansparse_core.models import build_random, weight_files

    spec = find_model(key)
    torch.manual_seed(0)
    model = build_random(spec).eval()
    path = weight_files(spec, folder / "models")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def random_imagenet_folder(folder: Path, key: str = R18) -> None:
    """``folder`` as a server's working folder: the model's random weights in RobustBench's layout under
    ``models/`` and its statistics (calibrated on random images) in the app's cache, ``.cache/stats``."""
    from meansparse_core.statistics import calibrate
    from meansparse_core.statistics_lookup import statistics_path

    model = random_imagenet_weights(folder, key)
    calibrate(model, torch.rand(4, *IMAGENET).split(2)).save(
        statistics_path(find_model(key), "imagenet", cache=folder / ".cache" / "stats"))


class Upload:
    """What ``st.file_uploader`` returns for an uploaded file (AppTest cannot drive the uploader widget)."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.data, self.file_id = name, data, str(hash(data))

    def getvalue(self) -> bytes:
        return self.data


@pytest.fixture
def photo_app(tmp_path, monkeypatch):
    """The app in a folder holding a random-weight ImageNet ResNet-18, and a slot for the uploaded photo."""
    pytest.importorskip("streamlit")
    import streamlit
    from streamlit.testing.v1 import AppTest

    random_imagenet_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEANSPARSE_MODELS", str(tmp_path / "models"))
    uploaded: dict[str, Upload] = {}
    real_uploader = streamlit.file_uploader

    def file_uploader(label, *args, key=None, **kwargs):
        if key == "image_upload":
            return uploaded.get("photo")
        return real_uploader(label, *args, key=key, **kwargs)

    monkeypatch.setattr(streamlit, "file_uploader", file_uploader)
    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=300).run()
    app.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    app.sidebar.selectbox(key="zoo_dataset").set_value("imagenet").run()
    return app, uploaded


def page_text(app) -> str:
    return "\n".join(e.value for e in [*app.markdown, *app.caption, *app.info, *app.warning, *app.error])


def top5_names(app) -> list[str]:
    chart = next(e for e in app.get("plotly_chart") if "predictions" in e.proto.id)
    return [name for trace in json.loads(chart.proto.spec)["data"] for name in trace["y"]]


def test_a_photo_goes_through_explore_and_layers_on_an_imagenet_model(photo_app):
    app, uploaded = photo_app
    models = app.sidebar.selectbox(key="zoo_model")
    assert any(o.endswith("Salman2020Do_R18 · fits a laptop") for o in models.options), models.options
    assert any(o.endswith("Salman2020Do_50_2") for o in models.options)  # 69M parameters: no mark
    models.set_value(find_model(R18)).run()
    assert not app.exception, app.exception
    assert "Clean image, true class tabby" in page_text(app)  # no ImageNet data here: the first built-in photo

    uploaded["photo"] = Upload("cat.jpg", photo_jpeg())
    app.run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    text = page_text(app)
    assert "short side resized to 256 px (bilinear), centre 224x224 crop" in text
    assert "true class unknown" in text and "true class tench" not in text  # no class 0 assumed
    assert set(top5_names(app)) <= set(imagenet_classes()) and len(top5_names(app)) == 10
    assert "PGD-10 on this image: " in text and " on this CPU" in text

    picker = app.selectbox(key="upload_label_imagenet")
    assert len(picker.options) == 1001 and picker.value is None
    picker.set_value(281).run()
    assert "Clean image, true class tabby" in page_text(app)
    next(n for n in app.number_input if n.label == "Steps").set_value(2)
    app.button(key="FormSubmitter:attack-Attack").click().run()
    assert not app.exception and not app.error
    assert "True class tabby" in page_text(app) and len(top5_names(app)) == 20

    app.selectbox(key="upload_label_imagenet").set_value(None).run()  # back to unknown: a new picked image
    app.button(key="FormSubmitter:attack-Attack").click().run()
    text = page_text(app)
    assert "True class unknown, so each model is judged against the base model's prediction" in text
    assert "True class tabby" not in text and "green is the base model's prediction" in text

    app.switch_page("views/layers.py").run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    assert "cat.jpg (true class unknown)" in page_text(app)
    drawn = " ".join(e.proto.id for e in app.get("plotly_chart"))
    assert all(key in drawn for key in ("layer_histogram", "fraction_replaced", "perturbation_split"))


def test_an_imagenet_model_with_no_data_at_all_gets_statistics_and_real_photos(tmp_path, monkeypatch):
    """No ImageNet folder anywhere: statistics from the BatchNorm layers and the built-in photos, then a
    built-in photo picked, attacked and looked at layer by layer, with ImageNet's class names."""
    pytest.importorskip("skimage")
    from streamlit.testing.v1 import AppTest

    random_imagenet_weights(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEANSPARSE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("MEANSPARSE_DATA", str(tmp_path / "data"))
    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=300).run()
    app.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    app.sidebar.selectbox(key="zoo_dataset").set_value("imagenet").run()
    app.sidebar.selectbox(key="zoo_model").set_value(find_model(R18)).run()
    assert "has no MeanSparse statistics" in page_text(app)
    app.sidebar.button(key="estimate_without_data").click().run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    assert ("Statistics: no training images: BatchNorm layers at 9 of 17 taps, 5 built-in photos at 8 of 17 taps "
            "(cached).") in page_text(app)
    assert "Clean image, true class tabby" in page_text(app)  # the first built-in photo, picked for the page

    app.button(key="pick_photo/coffee.png").click().run()
    assert "Clean image, true class espresso" in page_text(app)
    next(n for n in app.number_input if n.label == "Steps").set_value(2)
    app.button(key="FormSubmitter:attack-Attack").click().run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    assert "True class espresso" in page_text(app) and set(top5_names(app)) <= set(imagenet_classes())

    app.switch_page("views/layers.py").run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    assert "a cup of espresso (espresso)" in page_text(app)
