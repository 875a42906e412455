"""Seeded, PHI-free synthetic oncology data: a stand-in for the private clinical notes and pathology reports.

Every patient is first drawn as a structured :class:`Case` (cancer type, site, laterality, histology, grade, size,
TNM, metastases, receptors, treatment phase, labs, symptoms, radiation plan). The case is then *rendered* into
text, and each task's answer is *derived* from the case with fixed rules, so a model can only reach the ceiling by
reading the context: metastases come from imaging lines with negated distractors, TNM is written with prefixes
(``cT2a cN0 cM0``) while the diagnosis uses the compact form (``nsclc t2an0m0``), plans follow labs and symptoms.

Phrasings come from :class:`Pool` objects. A pool holds ``seen`` variants (train and val) and ``held`` variants
(test only); each record lists the variant ids it used in ``templates`` (``name#s3`` seen, ``name#t1`` held out,
``name#c0`` common to all splits, ``name#paper`` the paper's own question templates). The pretraining corpus may
use both, since it is unlabelled text about other patients.

Pure Python (``random`` only); the same seed gives byte-identical output.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

TASKS = ("phenotype", "diagnosis", "treatment_plan", "radonc_regimen", "radonc_modality", "radonc_icd10")
SPLITS = ("train", "val", "test")
NOT_RELEVANT = "Not relevant"

INSTRUCTIONS = {
    "phenotype": "You are a medical expert, this task involves answering the question based on the provided "
                 "context or text.",
    "diagnosis": "You are a medical expert. This task involves generating the diagnosis based on the provided "
                 "context or text",
    "treatment_plan": "You are a medical expert. This task involves generating the treatment plan based on the "
                      "provided context or text",
    "radonc_regimen": "You are a radiation oncologist. Based on the patient diagnosis details, write the radiation "
                      "treatment regimen.",
    "radonc_modality": "You are a radiation oncologist. Based on the patient diagnosis details, select the radiation "
                       "treatment modality: photon, proton, electron or brachy.",
    "radonc_icd10": "You are a radiation oncologist. Based on the patient diagnosis details, give the ICD-10 code "
                    "of the primary diagnosis.",
}

# The eight entity types with the paper's Table 1 question (Q3 asks for receptor names; Q4, "receptor type",
# is the one left for the receptor *status* entity).
ENTITY_TYPES = ("tumor_size", "histological_type", "receptor_type", "receptor_status", "tumor_laterality",
                "cancer_stage", "tumor_site", "cancer_grade")
PAPER_QUESTIONS = {
    "tumor_size": "What is the tumor size in the given context?",
    "histological_type": "What is the histological type in the given context?",
    "receptor_type": "Please identify the receptors mentioned in the provided context.",
    "receptor_status": "What is the receptor type in the given context?",
    "tumor_laterality": "Please identify the value of tumor laterality in the provided context.",
    "cancer_stage": "What is the stage of cancer in the given context?",
    "tumor_site": "Please describe the tumor location in the given context",
    "cancer_grade": "What is the grade of cancer in the given context?",
}


# ----------------------------------------------------------------------------------------------------------------
# Phrasing pools and the per-document writer
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pool:
    """Variants of one phrasing: ``seen`` ones for train/val, ``held`` ones only for test (none: common to all)."""

    name: str
    seen: tuple[str, ...]
    held: tuple[str, ...] = ()

    def options(self, split: str) -> list[tuple[str, str]]:
        """(variant id, text) pairs usable in ``split`` ('train', 'val', 'test' or 'any')."""
        if not self.held:
            return [(f"{self.name}#c{i}", t) for i, t in enumerate(self.seen)]
        seen = [(f"{self.name}#s{i}", t) for i, t in enumerate(self.seen)]
        held = [(f"{self.name}#t{i}", t) for i, t in enumerate(self.held)]
        return held if split == "test" else seen + held if split == "any" else seen


class Writer:
    """The random choices of one document: a seeded rng, the split whose phrasings it may use, the ids it used."""

    def __init__(self, rng: random.Random, split: str):
        self.rng = rng
        self.split = split
        self.used: set[str] = set()

    def pick(self, pool: Pool, **fmt: object) -> str:
        """One variant of ``pool`` (formatted with ``fmt`` when given), remembering its id."""
        vid, text = self.rng.choice(pool.options(self.split))
        self.used.add(vid)
        return text.format(**fmt) if fmt else text

    def choice(self, seq):
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def templates(self) -> list[str]:
        return sorted(self.used)


P = Pool
HEADERS = {
    "reason": P("hdr.reason", ("Reason for visit:", "REASON FOR VISIT:", "RFV:", "Reason for Visit -"),
                ("Chief concern / reason seen:", "VISIT REASON:")),
    "site": P("hdr.site", ("Treatment site:", "TX SITE:", "Site of treatment:", "Treatment Site -"),
              ("Area under treatment:", "TREATED REGION:")),
    "subjective": P("hdr.subjective", ("Subjective:", "S:", "SUBJECTIVE:", "Interval history:"),
                    ("History of present illness:", "Patient reports:")),
    "ros": P("hdr.ros", ("Nursing review of systems:", "Nursing ROS:", "ROS (nursing):", "NURSING ROS"),
             ("Review of systems per RN:", "RN symptom review:")),
    "objective": P("hdr.objective", ("Objective:", "O:", "OBJECTIVE:", "Exam/imaging:"),
                   ("Examination and studies:", "Findings:")),
    "labs": P("hdr.labs", ("Labs:", "Lab results:", "LABS:", "Laboratory:"), ("Pertinent laboratory data:",
                                                                             "Bloodwork today:")),
    "diagnosis": P("hdr.diagnosis", ("Diagnosis:", "Dx:", "DIAGNOSIS:", "Oncologic dx:"),
                   ("Primary oncologic problem:", "Working diagnosis:")),
    "assessment": P("hdr.assessment", ("Assessment:", "A:", "ASSESSMENT:", "Impression:"),
                    ("Clinical impression:", "Summary assessment:")),
    "plan": P("hdr.plan", ("Plan:", "P:", "PLAN:", "Recommendations:"), ("Next steps:", "Disposition/plan:")),
}
SECTION_ORDER = ("reason", "site", "subjective", "ros", "objective", "labs", "diagnosis", "assessment", "plan")

MISSPELLINGS = {
    "diagnosis": "dinosis", "patient": "pateint", "received": "recieved", "tolerating": "tolerting",
    "appetite": "appetit", "occasional": "ocasional", "recommend": "reccomend", "nausea": "nausia",
    "discussed": "disscussed", "fatigue": "fatige", "denies": "denys", "weeks": "wks", "tolerated": "tolorated",
    "consistent": "consistant", "evidence": "evidance", "following": "follwing", "significant": "signficant",
    "specimen": "speciman", "identified": "identifed", "scheduled": "schedueled", "cancer": "cnacer",
}
_MISSPELL_RE = re.compile(r"\b(" + "|".join(MISSPELLINGS) + r")\b")


def misspell(w: Writer, text: str, rate: float = 0.04) -> str:
    """Replace a few common words by the misspellings real notes contain."""
    return _MISSPELL_RE.sub(lambda m: MISSPELLINGS[m.group(1)] if w.chance(rate) else m.group(1), text)


# ----------------------------------------------------------------------------------------------------------------
# The 17 cancer types
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cancer:
    """What varies by cancer type. Subsites are (text, ICD-10 template with {lat}, allowed sides)."""

    key: str
    name: str
    organ: str
    histologies: tuple[tuple[str, str], ...]
    subsites: tuple[tuple[str, str, str], ...]
    grading: str
    mets: tuple[str, ...]
    first_line: tuple[str, ...]
    second_line: tuple[str, ...]
    surgery: str
    marker: str = ""
    receptors: tuple[str, ...] = ()
    sex: str = ""
    weight: float = 1.0
    abbrev: str = ""
    staging: str = "AJCC"


CANCERS: tuple[Cancer, ...] = (
    Cancer("breast", "breast cancer", "breast",
           (("invasive ductal carcinoma", "idc"), ("invasive lobular carcinoma", "ilc")),
           (("upper outer quadrant", "C50.41{lat}", "LR"), ("upper inner quadrant", "C50.21{lat}", "LR"),
            ("lower outer quadrant", "C50.51{lat}", "LR"), ("lower inner quadrant", "C50.31{lat}", "LR"),
            ("central portion", "C50.11{lat}", "LR")),
           "nottingham", ("bone", "liver", "lung", "brain"), ("ac-t", "tchp", "weekly paclitaxel"),
           ("capecitabine", "trastuzumab deruxtecan"), "lumpectomy", "ca 27-29", ("ER", "PR", "HER2"), "F", 3.0),
    Cancer("lung", "lung cancer", "lung",
           (("adenocarcinoma", "adenoca"), ("squamous cell carcinoma", "scc"), ("small cell carcinoma", "sclc")),
           (("upper lobe", "C34.1{lat}", "LR"), ("lower lobe", "C34.3{lat}", "LR"), ("middle lobe", "C34.2", "R")),
           "differentiation", ("brain", "bone", "liver", "adrenal"),
           ("carboplatin/pemetrexed/pembrolizumab", "carboplatin/paclitaxel/pembrolizumab", "cisplatin/etoposide"),
           ("docetaxel", "docetaxel/ramucirumab", "lurbinectedin"), "lobectomy", "", (), "", 2.4, "nsclc"),
    Cancer("colorectal", "colon cancer", "colon", (("adenocarcinoma", "adenoca"),),
           (("sigmoid colon", "C18.7", ""), ("ascending colon", "C18.2", ""), ("cecum", "C18.0", ""),
            ("transverse colon", "C18.4", ""), ("rectum", "C20", ""), ("rectosigmoid junction", "C19", "")),
           "differentiation", ("liver", "lung", "peritoneal"), ("folfox", "capox"), ("folfiri/bevacizumab",),
           "colectomy", "cea", weight=1.6),
    Cancer("prostate", "prostate cancer", "prostate", (("acinar adenocarcinoma", "adenoca"),),
           (("prostate", "C61", ""),), "gleason", ("bone", "nodal"), ("leuprolide/abiraterone", "docetaxel"),
           ("enzalutamide", "cabazitaxel"), "prostatectomy", "psa", (), "M", 1.6),
    Cancer("pancreas", "pancreatic cancer", "pancreas", (("ductal adenocarcinoma", "pdac"),),
           (("pancreatic head", "C25.0", ""), ("pancreatic body", "C25.1", ""), ("pancreatic tail", "C25.2", "")),
           "differentiation", ("liver", "peritoneal", "lung"), ("folfirinox", "gemcitabine/nab-paclitaxel"),
           ("nal-iri/5-fu",), "whipple", "ca 19-9", weight=0.9),
    Cancer("ovary", "ovarian cancer", "", (("high-grade serous carcinoma", "hgsc"),),
           (("ovary", "C56.{lat}", "LR"),), "serous", ("liver", "lung"), ("carboplatin/paclitaxel",),
           ("pegylated liposomal doxorubicin",), "debulking surgery", "ca-125", (), "F", 0.8, "", "FIGO"),
    Cancer("endometrium", "endometrial cancer", "uterus", (("endometrioid adenocarcinoma", "endometrioid"),),
           (("endometrium", "C54.1", ""),), "figo", ("lung", "peritoneal"), ("carboplatin/paclitaxel/dostarlimab",),
           ("lenvatinib/pembrolizumab",), "hysterectomy", "", ("ER", "PR"), "F", 0.8, "", "FIGO"),
    Cancer("cervix", "cervical cancer", "cervix", (("squamous cell carcinoma", "scc"),),
           (("cervix", "C53.9", ""), ("endocervix", "C53.0", ""), ("exocervix", "C53.1", "")),
           "differentiation", ("lung", "bone"), ("weekly cisplatin",),
           ("carboplatin/paclitaxel/bevacizumab",), "radical hysterectomy", "", (), "F", 0.6, "", "FIGO"),
    Cancer("bladder", "bladder cancer", "bladder", (("urothelial carcinoma", "uc"),),
           (("trigone", "C67.0", ""), ("bladder dome", "C67.1", ""), ("lateral bladder wall", "C67.2", ""),
            ("posterior bladder wall", "C67.4", "")),
           "urothelial", ("bone", "lung", "liver"), ("gemcitabine/cisplatin",), ("enfortumab vedotin",),
           "cystectomy", weight=0.8),
    Cancer("kidney", "kidney cancer", "kidney", (("clear cell renal cell carcinoma", "ccrcc"),),
           (("upper pole", "C64.{lat}", "LR"), ("lower pole", "C64.{lat}", "LR"), ("interpolar region", "C64.{lat}",
                                                                                   "LR")),
           "isup", ("lung", "bone"), ("ipilimumab/nivolumab", "pembrolizumab/axitinib"), ("cabozantinib",),
           "nephrectomy", "", (), "", 0.8, "rcc"),
    Cancer("melanoma", "melanoma", "", (("superficial spreading melanoma", "ssm"), ("nodular melanoma", "nm")),
           (("upper arm", "C43.6{lat}", "LR"), ("lower leg", "C43.7{lat}", "LR"), ("upper back", "C43.59", ""),
            ("scalp", "C43.4", "")),
           "none", ("lung", "brain", "liver"), ("nivolumab", "ipilimumab/nivolumab"), ("relatlimab/nivolumab",),
           "wide local excision", "ldh", weight=0.9),
    Cancer("head_neck", "head and neck cancer", "", (("squamous cell carcinoma", "scc"),),
           (("tonsil", "C09.9", "LR"), ("base of tongue", "C01", ""), ("glottic larynx", "C32.0", ""),
            ("oral tongue", "C02.1", "LR")),
           "differentiation", ("lung", "bone"), ("weekly cisplatin",), ("pembrolizumab",), "neck dissection",
           weight=1.0, abbrev="hnscc"),
    Cancer("esophagus", "esophageal cancer", "esophagus", (("adenocarcinoma", "adenoca"),
                                                           ("squamous cell carcinoma", "scc")),
           (("distal esophagus", "C15.5", ""), ("mid esophagus", "C15.4", ""), ("gastroesophageal junction",
                                                                                "C16.0", "")),
           "differentiation", ("liver", "lung", "nodal"), ("weekly carboplatin/paclitaxel",), ("folfox/nivolumab",),
           "esophagectomy", "", ("HER2",), "", 0.6),
    Cancer("stomach", "gastric cancer", "stomach", (("adenocarcinoma", "adenoca"),
                                                    ("signet ring cell carcinoma", "src")),
           (("gastric antrum", "C16.3", ""), ("gastric body", "C16.2", ""), ("gastric cardia", "C16.0", ""),
            ("lesser curvature", "C16.5", "")),
           "differentiation", ("liver", "peritoneal"), ("flot", "capox/trastuzumab"), ("ramucirumab/paclitaxel",),
           "gastrectomy",
           "cea", ("HER2",), "", 0.6),
    Cancer("liver", "liver cancer", "liver", (("hepatocellular carcinoma", "hcc"),),
           (("right hepatic lobe", "C22.0", ""), ("left hepatic lobe", "C22.0", ""), ("hepatic segment 7", "C22.0",
                                                                                    "")),
           "differentiation", ("lung", "bone"), ("atezolizumab/bevacizumab",), ("lenvatinib",), "hepatectomy",
           "afp", (), "", 0.7, "hcc"),
    Cancer("brain", "glioblastoma", "", (("glioblastoma idh-wildtype", "gbm"),),
           (("frontal lobe", "C71.1", "LR"), ("temporal lobe", "C71.2", "LR"), ("parietal lobe", "C71.3", "LR")),
           "who", (), ("temozolomide",), ("bevacizumab", "lomustine"), "craniotomy", weight=0.6, staging="none"),
    Cancer("thyroid", "thyroid cancer", "", (("papillary thyroid carcinoma", "ptc"),),
           (("thyroid lobe", "C73", "LR"), ("thyroid isthmus", "C73", "")),
           "none", ("lung", "bone"), ("lenvatinib",), ("cabozantinib",), "total thyroidectomy", "thyroglobulin",
           weight=0.6),
)
CANCER_BY_KEY = {c.key: c for c in CANCERS}
_CANCER_WEIGHTS = [c.weight for c in CANCERS]

NEUROTOXIC = {"folfox": "oxaliplatin", "capox": "oxaliplatin", "folfirinox": "oxaliplatin", "flot": "oxaliplatin",
              "capox/trastuzumab": "oxaliplatin",
              "ac-t": "paclitaxel", "weekly paclitaxel": "paclitaxel", "carboplatin/paclitaxel": "paclitaxel",
              "weekly carboplatin/paclitaxel": "paclitaxel", "gemcitabine/nab-paclitaxel": "nab-paclitaxel",
              "carboplatin/paclitaxel/dostarlimab": "paclitaxel", "docetaxel": "docetaxel",
              "carboplatin/paclitaxel/pembrolizumab": "paclitaxel"}
ORAL_OR_HORMONAL = {"leuprolide/abiraterone", "enzalutamide", "lenvatinib", "cabozantinib", "temozolomide",
                    "capecitabine", "lenvatinib/pembrolizumab"}
INTERVAL_WEEKS = {"folfox": 2, "folfirinox": 2, "flot": 2, "folfiri/bevacizumab": 2, "ac-t": 2, "nivolumab": 4,
                  "weekly paclitaxel": 1, "weekly cisplatin": 1, "weekly carboplatin/paclitaxel": 1,
                  "gemcitabine/nab-paclitaxel": 1, "temozolomide": 4, "leuprolide/abiraterone": 4}
MARKER_RANGE = {"psa": (0.1, 25.0), "cea": (1.0, 60.0), "ca-125": (8.0, 450.0), "ca 19-9": (10.0, 900.0),
                "afp": (2.0, 400.0), "ldh": (140.0, 620.0), "thyroglobulin": (0.1, 30.0), "ca 27-29": (12.0, 160.0)}
MAINTENANCE = {"breast": "anastrozole", "prostate": "leuprolide", "thyroid": "levothyroxine", "endometrium": "",
               "lung": "", "ovary": "olaparib"}


# ----------------------------------------------------------------------------------------------------------------
# One patient, drawn as structured facts
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RadPlan:
    """A radiation prescription, the context cue that justifies it and the chemotherapy given with it, if any."""

    dose: float
    fx: int
    modality: str
    target: str
    cue: str
    chemo: str = ""


@dataclass
class Case:
    """Everything about one synthetic patient that the text and the answers are derived from."""

    pid: str
    cancer: Cancer
    age: int
    sex: str
    histology: tuple[str, str]
    sub: str
    side: str | None
    icd: str
    grade: int
    gleason: tuple[int, int]
    size_cm: float
    t: str
    n: str
    m: int
    stage: str
    prefix: str
    mets: list[str]
    receptors: dict[str, str]
    phase: str
    regimen: str
    next_regimen: str
    cycle: int
    labs: dict[str, float]
    marker_value: float
    marker_rising: bool
    symptoms: dict[str, int]
    ecog: int
    surgery_done: bool
    staging_done: bool
    comorbidity: str
    rt: RadPlan
    rt_fraction: int
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.cancer.key

    @property
    def has_tnm(self) -> bool:
        return self.cancer.staging != "none"

    @property
    def rectal(self) -> bool:
        return self.key == "colorectal" and self.sub in RECTAL_SITES

    @property
    def dx_name(self) -> str:
        """Plain cancer name used in diagnoses ('rectal cancer' for a rectal primary)."""
        return "rectal cancer" if self.rectal else self.cancer.name

    @property
    def hist_abbrev(self) -> str:
        return self.histology[1]

    @property
    def surgery(self) -> str:
        """The operation for this primary: a distal pancreatectomy for the pancreatic body or tail (a Whipple is for
        the head), a mastectomy for a T4 breast cancer (skin or chest wall involved: no breast conservation), a low
        anterior resection (total mesorectal excision) for a rectal cancer."""
        if self.key == "pancreas" and self.sub != "pancreatic head":
            return "distal pancreatectomy"
        if self.rectal:
            return "low anterior resection"
        if self.key == "breast" and self.t.startswith("4"):
            return "mastectomy"
        return self.cancer.surgery


_T_SUB = {"breast": {"1": ("1a", "1b", "1c")}, "lung": {"1": ("1a", "1b", "1c"), "2": ("2a", "2b")},
          "prostate": {"1": ("1c",), "2": ("2a", "2b", "2c"), "3": ("3a", "3b")}}
_N_SUB = {"breast": {"1": ("1a", "1mi"), "2": ("2a",)}, "head_neck": {"2": ("2a", "2b", "2c")}}
# Tumour size (mm) per T category: the AJCC 8 size cut-offs for breast and lung, disjoint increasing ranges elsewhere.
_SIZE_MM = {
    "breast": {"1a": (2, 5), "1b": (6, 10), "1c": (11, 20), "2": (21, 50), "3": (51, 90), "4": (21, 95)},
    "lung": {"1a": (5, 10), "1b": (11, 20), "1c": (21, 30), "2a": (31, 40), "2b": (41, 50), "3": (51, 70),
             "4": (71, 95)},
}
_SIZE_MM_DEFAULT = {"1": (5, 20), "2": (21, 40), "3": (41, 65), "4": (66, 95)}
_SIZE_MM_NO_TNM = (20, 65)


def _draw_size(rng: random.Random, key: str, t: str) -> float:
    """Tumour size in cm, drawn inside the range its T category allows."""
    if not t:
        lo, hi = _SIZE_MM_NO_TNM
    else:
        table = _SIZE_MM.get(key, {})
        lo, hi = table.get(t) or table.get(t[0]) or _SIZE_MM_DEFAULT[t[0]]
    return rng.randint(lo, hi) / 10


def _breast_stage(t: str, n: str) -> str:
    """AJCC 8th edition anatomic stage group for breast cancer (M0)."""
    ti, ni = t[0], n[0]
    if ni == "3":
        return "IIIC"
    if ti == "4":
        return "IIIB"
    if ni == "2":
        return "IIIA"
    if ni == "1":
        return "IB" if n == "1mi" and ti == "1" else {"1": "IIA", "2": "IIB", "3": "IIIA"}[ti]
    return {"1": "IA", "2": "IIA", "3": "IIB"}[ti]


def _lung_stage(t: str, n: str) -> str:
    """AJCC 8th edition stage group for lung cancer (M0)."""
    small = t[0] in "12"
    if n[0] == "3":
        return "IIIB" if small else "IIIC"
    if n[0] == "2":
        return "IIIA" if small else "IIIB"
    if n[0] == "1":
        return "IIB" if small else "IIIA"
    return {"1a": "IA1", "1b": "IA2", "1c": "IA3", "2a": "IB", "2b": "IIA", "3": "IIB", "4": "IIIA"}[t]


def stage_group(t: str, n: str, m: int, key: str = "") -> str:
    """Stage group from T, N and M: AJCC 8 tables for breast and lung, one generic AJCC-like rule otherwise."""
    if m:
        return "IV"
    if key == "breast":
        return _breast_stage(t, n)
    if key == "lung":
        return _lung_stage(t, n)
    ti, ni = int(t[0]), int(n[0])
    if ni == 0:
        return ("IA", "IB", "IIA", "IIB")[ti - 1]
    if ni == 1:
        return "IIIA" if ti <= 2 else "IIIB"
    if ni == 2:
        return "IIIB" if ti <= 2 else "IIIC"
    return "IIIC"


def stage_system(case: "Case") -> str:
    """The staging system a stage group is labelled with (an edition only where real tables are used)."""
    return "AJCC 8th edition" if case.key in ("breast", "lung") else case.cancer.staging


def _draw_tnm(rng: random.Random, cancer: Cancer) -> tuple[str, str, int]:
    if cancer.staging == "none":
        return "", "", 0
    t = rng.choices("1234", weights=(3, 3, 2, 1.5))[0]
    n = rng.choices("0123", weights=(5, 3, 2, 0.6))[0]
    m = 1 if rng.random() < 0.28 else 0
    t = rng.choice(_T_SUB.get(cancer.key, {}).get(t, (t,)))
    n = rng.choice(_N_SUB.get(cancer.key, {}).get(n, (n,)))
    return t, n, m


def _draw_receptors(rng: random.Random, cancer: Cancer, histology: str) -> dict[str, str]:
    if cancer.key in ("esophagus", "stomach") and "adeno" not in histology:
        return {}
    out: dict[str, str] = {}
    for r in cancer.receptors:
        if r == "HER2":
            out[r] = rng.choices(("negative", "positive", "equivocal"), weights=(6, 2, 1))[0]
        else:
            out[r] = "positive" if rng.random() < 0.75 else "negative"
    if out.get("ER") == "negative" and "PR" in out and rng.random() < 0.8:
        out["PR"] = "negative"
    return out


def _draw_labs(rng: random.Random, phase: str) -> dict[str, float]:
    on_tx = phase in ("chemo", "radiation")
    anc = round(rng.uniform(0.4, 0.99), 2) if on_tx and rng.random() < 0.18 else round(rng.uniform(1.6, 6.5), 1)
    plt = rng.randint(42, 74) if on_tx and rng.random() < 0.1 else rng.randint(140, 390)
    hgb = round(rng.uniform(6.8, 7.9), 1) if on_tx and rng.random() < 0.1 else round(rng.uniform(9.0, 14.8), 1)
    cr = round(rng.uniform(1.6, 2.3), 1) if rng.random() < 0.08 else round(rng.uniform(0.6, 1.2), 2)
    wbc = round(max(anc + rng.uniform(0.8, 3.0), 1.0), 1)
    return {"wbc": wbc, "anc": anc, "hgb": hgb, "plt": plt, "cr": cr, "ast": rng.randint(12, 48),
            "alt": rng.randint(9, 52), "na": rng.randint(133, 144), "k": round(rng.uniform(3.4, 5.0), 1)}


def _draw_symptoms(rng: random.Random, case_phase: str, key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in (("nausea", 0.3), ("fatigue", 0.6), ("pain", 0.35), ("neuropathy", 0.25), ("diarrhea", 0.15)):
        if rng.random() < p:
            out[name] = rng.choice((1, 1, 2, 2, 3)) if name == "pain" else rng.choice((1, 1, 2))
    if case_phase == "radiation":
        out["dermatitis"] = rng.choice((0, 1, 1, 2))
        if key in ("lung", "esophagus", "head_neck") and rng.random() < 0.6:
            out["esophagitis"] = rng.choice((1, 2))
    if case_phase not in ("chemo", "progression"):
        out.pop("neuropathy", None)
    return out


RECTAL_SITES = ("rectum", "rectosigmoid junction")
NO_ADJUVANT_SYSTEMIC = ("kidney", "thyroid")  # systemic therapy only for metastatic disease
_STAGE_I = re.compile(r"I[AB]?\d?")


def _draw_phase(rng: random.Random, key: str, sub: str, t: str, n: str, m: int, mets: list[str]) -> str:
    """The treatment phase the note is written in, as the tumour allows: no chemotherapy for a stage I tumour (nor
    without metastases for kidney and thyroid); a colon (not rectal) primary is resected, then gets adjuvant
    chemotherapy only for N+ or T4 disease, and radiation only for brain or bone metastases."""
    phases = {"chemo": 4, "progression": 3, "radiation": 3} if m else dict.fromkeys(
        ("consult", "chemo", "radiation", "surveillance"), 2.5)
    if not m and (key in NO_ADJUVANT_SYSTEMIC or t and _STAGE_I.fullmatch(stage_group(t, n, m, key))):
        phases.pop("chemo")
    if key == "colorectal" and sub not in RECTAL_SITES:
        if not {"brain", "bone"} & set(mets):
            phases.pop("radiation")
        if not m and n == "0" and not t.startswith("4"):
            phases.pop("chemo", None)
    return rng.choices(list(phases), weights=list(phases.values()))[0]


_METASTATIC_ONLY = {"prostate": "taxel", "melanoma": "ipilimumab"}


def _regimen_fits(reg: str, key: str, hist: str, receptors: dict[str, str], m: int, first: bool) -> bool:
    """Whether a regimen suits the tumour: trastuzumab for HER2+ breast and only for it, first-line for metastatic
    HER2+ gastric cancer and only for it (perioperative FLOT otherwise), etoposide only for small cell lung,
    pemetrexed never for squamous lung; taxanes for prostate cancer and ipilimumab for melanoma only when
    metastatic (not as adjuvant therapy)."""
    her2 = receptors.get("HER2") == "positive"
    if key == "breast":
        return ("trastuzumab" in reg or reg == "tchp") == her2
    if key == "stomach":
        return ("trastuzumab" in reg) == (her2 and bool(m) and first)
    if key in _METASTATIC_ONLY and _METASTATIC_ONLY[key] in reg:
        return bool(m)
    if key == "lung":
        small = reg in ("cisplatin/etoposide", "lurbinectedin")
        return small if hist == "sclc" else not small and not (hist == "scc" and "pemetrexed" in reg)
    return True


def _draw_regimens(rng: random.Random, cancer: Cancer, hist: str, receptors: dict[str, str],
                   m: int) -> tuple[str, str]:
    """(first-line, next-line) regimens that fit the histology, receptors and metastatic state."""
    first = [r for r in cancer.first_line if _regimen_fits(r, cancer.key, hist, receptors, m, True)]
    second = [r for r in cancer.second_line if _regimen_fits(r, cancer.key, hist, receptors, m, False)]
    return rng.choice(first), rng.choice(second)


ADJUVANT_RT = ("breast", "endometrium", "stomach", "thyroid", "melanoma")  # radiation follows the operation
NEOADJUVANT_RT = ("esophagus", "colorectal", "pancreas")  # radiation precedes the operation
NO_SURGERY = ("liver",)  # radiation is offered instead of resection


def _draw_surgery(rng: random.Random, case: Case) -> bool:
    """Whether the primary has been resected, consistent with the phase and where radiation sits in treatment (a
    colon cancer's chemotherapy and surveillance follow its colectomy)."""
    key, m, phase = case.key, case.m, case.phase
    if m or phase == "consult" or key in NO_SURGERY:
        return False
    if key == "colorectal" and not case.rectal:
        return True
    if key in ADJUVANT_RT and phase in ("radiation", "surveillance"):
        return True
    if key in NEOADJUVANT_RT and phase == "radiation":
        return False
    return rng.random() < 0.6


NO_RT = RadPlan(0.0, 0, "", "", "")  # no radiation indication: no radiation-oncology records

BONE_SITES = ("T10 vertebral body", "L3 vertebral body", "right femur", "left iliac bone", "right humerus")
_PRIMARY_SYMPTOM = {"lung": "hemoptysis", "bladder": "hematuria", "cervix": "vaginal bleeding",
                    "endometrium": "vaginal bleeding", "colorectal": "bleeding", "stomach": "bleeding",
                    "esophagus": "dysphagia", "head_neck": "pain and bleeding"}


def _srs_dose(largest_cm: float) -> float:
    """Single-fraction SRS dose by the largest lesion (RTOG 90-05)."""
    return 24.0 if largest_cm <= 2.0 else 18.0 if largest_cm <= 3.0 else 15.0


def _rt_palliative(rng: random.Random, case: Case) -> RadPlan:
    """Brain mets first (SRS for 1-4 lesions, whole brain beyond), then a bone lesion, else the symptomatic primary."""
    if "brain" in case.mets:
        n_les, largest = int(case.extras["brain_lesions"]), float(case.extras["brain_largest"])
        if n_les <= 4:
            noun = "metastasis" if n_les == 1 else "metastases"
            return RadPlan(_srs_dose(largest), 1, "photon", "brain",
                           f"{n_les} brain {noun}, largest {largest:.1f} cm, SRS candidate")
        return RadPlan(30.0, 10, "photon", "whole brain", f"{n_les} brain metastases, whole brain radiation")
    if "bone" in case.mets:
        bone = case.extras["bone_site"]
        if case.ecog >= 3:
            return RadPlan(8.0, 1, "photon", bone, f"painful {bone} lesion, ECOG {case.ecog}, limited life expectancy")
        if "vertebral" in bone and rng.random() < 0.5:
            return RadPlan(30.0, 10, "photon", bone, f"{bone} lesion with epidural extension, no cord compression")
        return RadPlan(20.0, 5, "photon", bone, f"painful {bone} lesion")
    if case.key == "colorectal" and not case.rectal:  # a colon primary is resected or stented, not irradiated
        return NO_RT
    site = f"{case.side} {case.sub}" if case.side else case.sub
    symptom = "rectal bleeding" if case.dx_name == "rectal cancer" else _PRIMARY_SYMPTOM.get(case.key, "pain")
    if case.ecog >= 3:
        return RadPlan(20.0, 5, "photon", site, f"symptomatic primary ({symptom}), ECOG {case.ecog}")
    return RadPlan(30.0, 10, "photon", site, f"symptomatic primary ({symptom}), palliative intent")


def _prostate_low_risk(case: Case) -> bool:
    """NCCN low risk: cT1-T2a, N0, Gleason <= 6 and PSA < 10."""
    return case.t in ("1c", "2a") and case.n == "0" and sum(case.gleason) <= 6 and case.marker_value < 10


def _rt_definitive(rng: random.Random, case: Case) -> RadPlan:
    """Curative-intent prescription by type, with the cue that selects dose and modality.

    Cues agree with the surgical history: 'post <operation>' only after it, 'inoperable' or 'intact' only without it.
    """
    k, ti, ni, young, done = case.key, int(case.t[:1] or 0), int(case.n[:1] or 0), case.age < 60, case.surgery_done
    site = f"{case.side} {case.sub}" if case.side else case.sub
    if k == "breast":
        if case.surgery == "mastectomy":  # T4: post-mastectomy radiation to the chest wall and nodes
            cue = "T4, post mastectomy" if done else "T4, mastectomy planned"
            return RadPlan(50.0, 25, "photon", f"{case.side} chest wall and regional nodes", cue)
        post = "post lumpectomy" if done else "lumpectomy planned"
        if ni >= 1:
            proton = case.side == "left" and bool(case.comorbidity)
            cue = f"node positive, {post}" + (f", {case.comorbidity}" if proton else "")
            return RadPlan(50.0, 25, "proton" if proton else "photon", f"{case.side} breast and regional nodes", cue)
        dose, fx = (26.0, 5) if case.age >= 65 else (40.05, 15)
        return RadPlan(dose, fx, "photon", f"{case.side} breast", f"node negative, {post}")
    if k == "lung":
        if done:
            why = "pN2 disease" if ni >= 2 else "positive bronchial margin"
            return RadPlan(54.0, 30, "photon", "bronchial stump and mediastinum", f"post lobectomy, {why}")
        if case.hist_abbrev == "sclc":
            return RadPlan(45.0, 30, "photon", "chest", "limited-stage small cell, twice daily, cisplatin/etoposide",
                           "cisplatin/etoposide")
        if ni == 0 and ti <= 2:
            central = rng.random() < 0.4
            return (RadPlan(50.0, 5, "photon", site, "central tumor, medically inoperable") if central
                    else RadPlan(54.0, 3, "photon", site, "peripheral tumor, medically inoperable"))
        chemo = concurrent_chemo(case)
        if case.comorbidity:
            return RadPlan(60.0, 30, "proton", "chest", f"locally advanced, {case.comorbidity}", chemo)
        return RadPlan(60.0, 30, "photon", "chest", "locally advanced, concurrent chemotherapy", chemo)
    if k == "prostate":
        if done:
            why = "pN1" if ni else "positive margin"
            return RadPlan(66.0, 33, "photon", "prostate bed", f"post prostatectomy, {why}")
        if _prostate_low_risk(case):
            return RadPlan(27.0, 2, "brachy", "prostate", "low risk, HDR monotherapy candidate")
        if ni:
            return RadPlan(70.0, 28, "photon", "prostate and pelvic nodes", "node positive, long-term ADT")
        if young:
            return RadPlan(70.0, 28, "proton", "prostate and seminal vesicles", "intermediate/high risk")
        return RadPlan(70.0, 28, "photon", "prostate and seminal vesicles", "intermediate/high risk")
    if k == "cervix":
        if done:
            why = "positive pelvic nodes, concurrent weekly cisplatin" if ni else "intermediate-risk features (Sedlis)"
            return RadPlan(45.0, 25, "photon", "pelvis", f"post radical hysterectomy, {why}",
                           "weekly cisplatin" if ni else "")
        if case.extras.get("ebrt_done"):
            return RadPlan(28.0, 4, "brachy", "cervix", "completed 45 Gy pelvic EBRT with weekly cisplatin")
        return RadPlan(45.0, 25, "photon", "pelvis", "intact cervix, concurrent weekly cisplatin planned",
                       "weekly cisplatin")
    if k == "endometrium":
        post = "post hysterectomy" if done else "hysterectomy planned"
        if ni == 0 and ti <= 2:
            return RadPlan(21.0, 3, "brachy", "vaginal cuff", f"{post}, intermediate risk, node negative")
        if ni == 0:
            return RadPlan(45.0, 25, "photon", "pelvis", f"{post}, T{case.t} high risk, node negative")
        return RadPlan(45.0, 25, "photon", "pelvis", f"{post}, node positive")
    if k == "brain":
        if case.age >= 70:
            return RadPlan(40.05, 15, "photon", site, "KPS 70, lives alone", "temozolomide")
        if young:
            return RadPlan(60.0, 30, "proton", site, "good performance status", "temozolomide")
        return RadPlan(60.0, 30, "photon", site, "concurrent temozolomide", "temozolomide")
    if k == "head_neck":
        if done:
            return (RadPlan(66.0, 33, "photon", site, "post-operative, extranodal extension", "weekly cisplatin")
                    if ni else RadPlan(60.0, 30, "photon", site, "post-operative, close margins"))
        if case.extras.get("p16") == "positive" and young:
            return RadPlan(70.0, 35, "proton", site, "p16 positive", "weekly cisplatin")
        return RadPlan(70.0, 35, "photon", site, "definitive chemoradiation", "weekly cisplatin")
    if k == "esophagus":
        if case.comorbidity:
            return RadPlan(50.4, 28, "proton", "esophagus", f"trimodality, {case.comorbidity}",
                           "weekly carboplatin/paclitaxel")
        return RadPlan(41.4, 23, "photon", "esophagus", "neoadjuvant chemoradiation (CROSS)",
                       "weekly carboplatin/paclitaxel")
    if k == "liver":
        if case.size_cm > 5.0:
            return RadPlan(67.5, 15, "proton", "liver", f"{case.size_cm:.1f} cm tumor, not a resection candidate")
        return RadPlan(50.0, 5, "photon", "liver", f"{case.size_cm:.1f} cm tumor, SBRT candidate")
    if k == "melanoma":
        if done:
            return RadPlan(30.0, 5, "electron", site, "close deep margin, superficial target")
        return RadPlan(30.0, 5, "electron", site, "medically inoperable, superficial target")
    if k == "colorectal" and not case.rectal:  # colon: only the bed of a resected T4 tumour fixed to a structure
        return (RadPlan(50.4, 28, "photon", "tumor bed", "post colectomy, T4 tumor adherent to a fixed structure, "
                        "positive margin", "capecitabine") if done and ti == 4 else NO_RT)
    if k == "colorectal":
        if done:
            return RadPlan(50.4, 28, "photon", "pelvis", "post low anterior resection, positive circumferential margin",
                           "capecitabine")
        if ti == 4 or ni >= 2:
            return RadPlan(50.4, 28, "photon", "pelvis", "locally advanced, long-course chemoradiation", "capecitabine")
        if ti == 3 or ni:
            return RadPlan(25.0, 5, "photon", "pelvis", "short-course radiation")
        return RadPlan(50.4, 28, "photon", "pelvis", "cT1-2 N0 low rectal tumor, organ preservation chemoradiation",
                       "capecitabine")
    if k == "pancreas":
        if done:
            return RadPlan(50.4, 28, "photon", "pancreatic bed", f"post {case.surgery}, positive margin",
                           "capecitabine")
        if ti <= 2:
            return RadPlan(33.0, 5, "photon", "pancreas", "borderline resectable, SBRT after induction")
        return RadPlan(50.4, 28, "photon", "pancreas", "locally advanced, concurrent capecitabine", "capecitabine")
    table = {"bladder": ((45.0, 25, "pelvis", "post cystectomy, positive margin") if done
                         else (55.0, 20, "bladder", "bladder preservation")),
             "kidney": ((45.0, 25, "nephrectomy bed", "post nephrectomy, positive margin") if done
                        else (42.0, 3, site, "medically inoperable, SBRT")),
             "stomach": ((45.0, 25, "stomach bed", "adjuvant chemoradiation") if done
                         else (45.0, 25, "stomach", "gastrectomy planned, preoperative chemoradiation")),
             "thyroid": ((66.0, 33, "thyroid bed and neck", "gross residual disease after thyroidectomy") if done
                         else (66.0, 33, "thyroid and neck", "unresectable disease, medically inoperable")),
             "ovary": ((30.0, 10, "pelvis", "symptomatic pelvic recurrence after debulking") if done
                       else (30.0, 10, "pelvis", "symptomatic pelvic mass"))}
    dose, fx, target, cue = table[k]
    return RadPlan(dose, fx, "photon", target, cue, "capecitabine" if k == "stomach" else "")  # chemoradiation


def draw_case(pid: str, seed: int) -> Case:
    """One patient; depends only on (seed, pid), so it is the same whatever the dataset size."""
    rng = random.Random(f"{seed}:{pid}:case")
    cancer = rng.choices(CANCERS, weights=_CANCER_WEIGHTS)[0]
    sex = cancer.sex or rng.choice("MF")
    histology = rng.choice(cancer.histologies)
    if cancer.key == "esophagus" and histology[1] == "scc":
        sub, icd_t, sides = cancer.subsites[1]
    else:
        sub, icd_t, sides = rng.choice(cancer.subsites)
    side = {"LR": rng.choice(("left", "right")), "R": "right"}.get(sides)
    icd = icd_t.format(lat="1" if side == "right" else "2")
    t, n, m = _draw_tnm(rng, cancer)
    picked = rng.sample(cancer.mets, rng.choice((1, 1, 2))) if m else []
    mets = [s for s in cancer.mets if s in picked]  # one fixed order, as the diagnosis lists them
    phase = _draw_phase(rng, cancer.key, sub, t, n, m, mets)
    receptors = _draw_receptors(rng, cancer, histology[0])
    first, second = _draw_regimens(rng, cancer, histology[1], receptors, m)
    comorbidity = rng.choice(("history of CAD s/p stent", "prior mediastinal RT for lymphoma")) \
        if rng.random() < 0.35 else ""
    case = Case(
        pid=pid, cancer=cancer, age=rng.randint(34, 88), sex=sex, histology=histology, sub=sub, side=side, icd=icd,
        grade=rng.choice((1, 2, 2, 3, 3)), gleason=rng.choice(((3, 3), (3, 4), (4, 3), (4, 4), (4, 5))),
        size_cm=_draw_size(rng, cancer.key, t), t=t, n=n, m=m,
        stage=stage_group(t, n, m, cancer.key) if t else "", prefix=rng.choice(("c", "p", "p")) if not m else "c",
        mets=mets, receptors=receptors, phase=phase,
        regimen=first, next_regimen=second, cycle=rng.randint(1, 6),
        labs=_draw_labs(rng, phase), marker_value=round(rng.uniform(*MARKER_RANGE.get(cancer.marker, (1.0, 50.0))), 1),
        marker_rising=rng.random() < 0.25, symptoms=_draw_symptoms(rng, phase, cancer.key),
        ecog=rng.choices((0, 1, 2, 3), weights=(3, 4, 2, 1))[0], surgery_done=False,
        staging_done=rng.random() < 0.6, comorbidity=comorbidity, rt=NO_RT, rt_fraction=0)
    case.surgery_done = _draw_surgery(rng, case)
    if case.prefix == "p" and not case.surgery_done:
        case.prefix = "c"
    if cancer.key == "head_neck":
        case.extras["p16"] = rng.choice(("positive", "negative"))
    if cancer.key == "cervix":
        case.extras["ebrt_done"] = "yes" if rng.random() < 0.35 and not case.surgery_done else ""
    if "bone" in mets:
        case.extras["bone_site"] = rng.choice(BONE_SITES)
    if "brain" in mets:
        case.extras["brain_lesions"] = str(rng.randint(1, 8))
        case.extras["brain_largest"] = f"{rng.uniform(0.6, 3.5):.1f}"
    case.rt = _rt_palliative(rng, case) if m else _rt_definitive(rng, case)
    case.rt_fraction = rng.randint(1, case.rt.fx) if case.rt.fx else 0
    return case


def positive_nodes(rng: random.Random, case: Case) -> int:
    """Positive lymph nodes consistent with N: 0 for N0, 1-3 for N1, 4-9 for N2, 10 or more for N3."""
    lo, hi = {"0": (0, 0), "1": (1, 3), "2": (4, 9), "3": (10, 16)}[case.n[:1] or "0"]
    return 1 if case.n == "1mi" else rng.randint(lo, hi)


# ----------------------------------------------------------------------------------------------------------------
# Entity phrases: each returns the text and the answer spans it contains
# ----------------------------------------------------------------------------------------------------------------

SITE_FORMS = P("site", ("{side} {organ}, {sub}", "{sub} of the {side} {organ}", "{side} {sub}"),
               ("{organ} ({side}), {sub}", "{side}-sided {organ}, {sub}"))
SITE_FORMS_BARE = P("site_bare", ("{side} {sub}", "{side} {sub}"), ("{sub}, {side}", "{sub} ({side} side)"))
LOBE_ABBREV = {("right", "upper lobe"): "RUL", ("left", "upper lobe"): "LUL", ("right", "lower lobe"): "RLL",
               ("left", "lower lobe"): "LLL", ("right", "middle lobe"): "RML"}
BREAST_ABBREV = {"upper outer quadrant": "UOQ", "upper inner quadrant": "UIQ", "lower outer quadrant": "LOQ",
                 "lower inner quadrant": "LIQ"}
# Clock hours of each quadrant of the left breast (as the examiner faces the patient); the right breast mirrors them.
LEFT_BREAST_HOURS = {"upper outer quadrant": (1, 2), "lower outer quadrant": (4, 5), "lower inner quadrant": (7, 8),
                     "upper inner quadrant": (10, 11)}


def breast_clock_hours(side: str, sub: str) -> tuple[int, ...]:
    """Clock hours that lie in quadrant ``sub`` of the ``side`` breast (none for the central portion)."""
    hours = LEFT_BREAST_HOURS.get(sub, ())
    return hours if side == "left" else tuple(12 - h for h in hours)


def site_phrase(w: Writer, case: Case, clock: bool = True) -> tuple[str, str, str | None]:
    """(phrase, tumor-site answer, laterality answer or None); the site answer never includes the side.

    ``clock=False`` keeps the quadrant (an ICD-10 code must stay recoverable from the phrase).
    """
    sub = case.sub
    if case.key == "breast" and sub in BREAST_ABBREV and w.chance(0.2):
        sub = BREAST_ABBREV[sub]
    if case.side is None:
        return sub, sub, None
    if (case.side, sub) in LOBE_ABBREV and w.chance(0.25):
        code = LOBE_ABBREV[(case.side, sub)]
        return code, code, None
    if clock and case.key == "breast" and case.sub in LEFT_BREAST_HOURS and w.chance(0.2):
        hour = f"{w.choice(breast_clock_hours(case.side, case.sub))}:00"
        return f"{case.side} breast at the {hour} position", f"{hour} position", case.side
    pool = SITE_FORMS if case.cancer.organ else SITE_FORMS_BARE
    return w.pick(pool, side=case.side, organ=case.cancer.organ, sub=sub), sub, case.side


SIZE_FORMS = P("size", ("{a} cm", "{mm} mm", "{a} x {b} x {c} cm", "{a} x {b} cm"),
               ("{a}cm", "{mm}mm in greatest dimension", "{a} by {b} cm"))


def size_phrase(w: Writer, cm: float) -> str:
    """Tumor size as written in a report; the whole phrase is the answer."""
    b, c = max(round(cm * 0.8, 1), 0.2), max(round(cm * 0.6, 1), 0.1)
    text = w.pick(SIZE_FORMS, a=f"{cm:.1f}", b=f"{b:.1f}", c=f"{c:.1f}", mm=int(round(cm * 10)))
    return text.replace(" in greatest dimension", "")


def distractor_size(w: Writer, cm: float) -> str:
    """A specimen (not tumor) measurement, to be ignored by a tumor-size question."""
    a = round(cm + w.rng.uniform(3.0, 9.0), 1)
    return f"{a:.1f} x {a * 0.7:.1f} x {a * 0.35:.1f} cm"


_DIFF = {1: "well differentiated", 2: "moderately differentiated", 3: "poorly differentiated"}
GRADE_FORMS = {
    "nottingham": P("grade.nottingham", ("grade {g}", "nottingham grade {g}", "histologic grade {g}",
                                         "g{g}"), ("nottingham histologic grade {g}/3", "grade {g} of 3")),
    "differentiation": P("grade.diff", ("{diff}", "grade {g}", "g{g}"), ("{diff} (grade {g})",)),
    "figo": P("grade.figo", ("figo grade {g}", "grade {g}"), ("figo {g}",)),
    "isup": P("grade.isup", ("isup grade {g}", "fuhrman grade {g}"), ("who/isup grade {g}",)),
}


def grade_phrase(w: Writer, case: Case) -> tuple[str, str] | None:
    """(text, answer) for the tumor grade, or None where the type has no grade."""
    system = case.cancer.grading
    if system == "none":
        return None
    if system == "gleason":
        a, b = case.gleason
        form = w.choice((f"gleason score {a}+{b}={a + b}", f"gleason {a}+{b}", f"gleason {a}+{b}={a + b}"))
        return f"{form} (grade group {_grade_group(a, b)})", form
    if system == "who":
        return "who grade 4", "who grade 4"
    if system in ("serous", "urothelial") or (case.key == "lung" and case.hist_abbrev == "sclc"):
        return "high grade", "high grade"
    g = case.grade
    text = w.pick(GRADE_FORMS[system], g=g, diff=_DIFF[g])
    return text, text.split(" (")[0].replace("/3", "").replace(" of 3", "")


def _grade_group(a: int, b: int) -> int:
    return {(3, 3): 1, (3, 4): 2, (4, 3): 3, (4, 4): 4}.get((a, b), 5)


def tnm_parts(case: Case, prefix: str = "") -> tuple[str, str, str]:
    """Prefixed T, N and M tokens as a report writes them (pT2a, pN1, cM0); ``prefix`` overrides the case's."""
    p = prefix or case.prefix
    return f"{p}T{case.t}", f"{p}N{case.n}", f"{'p' if case.m and p == 'p' else 'c'}M{case.m}"


STAGE_FORMS = P("stage", ("{t} {n} {m}", "{t} {n} {m}, stage {s}", "{compact}", "{system} stage {s}"),
                ("stage {s} ({t}, {n}, {m})", "{t}/{n}/{m}", "{system} {s}"))


def stage_phrase(w: Writer, case: Case, prefix: str = "") -> tuple[str, list[str]] | None:
    """(text, answers): every T/N/M token and the stage group present, as written."""
    if not case.has_tnm:
        return None
    t, n, m = tnm_parts(case, prefix)
    compact = f"{t}{n[1:]}{m[1:]}"
    text = w.pick(STAGE_FORMS, t=t, n=n, m=m, s=case.stage, compact=compact, system=stage_system(case))
    if compact in text:
        return text, [compact]
    answers = [x for x in (t, n, m) if x in text]
    return text, answers + ([case.stage] if f" {case.stage}" in text else [])


RECEPTOR_STYLES = P("receptor", ("sym", "word", "word_short"), ("pct", "colon"))
_LONG = {"ER": "estrogen receptor", "PR": "progesterone receptor", "HER2": "her2/neu"}
_HER2_IHC = {"positive": "3+", "negative": "1+", "equivocal": "2+"}


def receptor_phrase(w: Writer, case: Case) -> tuple[str, list[str], list[str]] | None:
    """(text, receptor names as written, receptor statuses as written) or None without receptors."""
    rec = case.receptors
    if not rec:
        return None
    style = w.pick(RECEPTOR_STYLES)
    if style == "sym" and rec.get("HER2") == "equivocal":
        style = "word_short"
    if style == "sym":
        toks = [f"{r}{'+' if s == 'positive' else '-'}" for r, s in rec.items()]
        hormone = [x for x in toks if not x.startswith("HER2")]
        her2 = [x for x in toks if x.startswith("HER2")]
        text = ", ".join(filter(None, ("/".join(hormone), ", ".join(her2))))
        return text, [t[:-1] for t in toks], toks
    names = {r: (_LONG[r] if style == "word" else r) for r in rec}
    if style == "pct":
        parts = [f"{names[r]} {s} ({_HER2_IHC[s]})" if r == "HER2" else
                 f"{names[r]} {s} ({w.rng.randint(60, 99) if s == 'positive' else 0}%)" for r, s in rec.items()]
    elif style == "colon":
        parts = [f"{names[r]}: {s}" for r, s in rec.items()]
    else:
        parts = [f"{names[r]} {s}" for r, s in rec.items()]
    text = ("; " if style == "colon" else ", ").join(parts)
    return text, list(names.values()), list(dict.fromkeys(rec.values()))


def hist_phrase(w: Writer, case: Case) -> str:
    full, abbr = case.histology
    if case.key == "breast" and w.chance(0.2):
        return abbr
    return full


# ----------------------------------------------------------------------------------------------------------------
# Task 1: phenotype extraction (sentence + question -> entity span(s) or "Not relevant")
# ----------------------------------------------------------------------------------------------------------------

# (template, source); slots: SITE H G S STAGE REC (entities) and SPEC MARGIN LN AGE SEX SURG (fillers/distractors)
PHENO_SENTENCES = Pool("pheno.sentence", (
    "{SITE}, core needle biopsy: {H}, {G}.|path",
    "tumor size: {S}; specimen measures {SPEC}.|path",
    "final diagnosis: {SITE}, excision - {H}, {G}, {S}.|path",
    "the cores are infiltrated by {H} growing in nests and sheets with areas of residual lumen formation.|path",
    "pathologic stage: {STAGE}.|path",
    "receptor studies: {REC}.|path",
    "{AGE} yo {SEX} with {H} of the {SITE}, {REC}, s/p {SURG}.|note",
    "{H} of the {SITE}, {S}, {G}; {MARGIN}.|path",
    "ct shows a {S} mass in the {SITE}; {LN}.|note",
    "{G} {H} is present in 3 of 4 cores.|path",
    "sections are submitted in cassettes a1-a6; {LN}.|path",
    "staging: {STAGE}; {REC}.|note",
), (
    "microscopic examination reveals {H}, {G}, involving the {SITE}, spanning {S}.|path",
    "{STAGE} per synoptic report; {LN}.|path",
    "biomarker panel: {REC} (performed on block a3).|path",
    "lesion at the {SITE} measures {S} on gross exam (overall specimen {SPEC}).|path",
    "clinic note: {AGE} year old {SEX} with a {S} {H} of the {SITE}, {STAGE}.|note",
    "{SITE} - {G}, {H}; {MARGIN}.|path",
    "addendum: no additional tissue received; {LN}.|path",
))
PARAPHRASES = {
    "tumor_size": (("How large is the tumor described in the text?", "What size is the lesion in this context?"),
                   ("Report the dimension of the tumor mentioned in this sentence.",)),
    "histological_type": (("Identify the histological type of the tumor in the given text.",
                           "Which histology is reported in the context?"),
                          ("What kind of tumor histology does the sentence report?",)),
    "receptor_type": (("List the receptors named in the text.", "Which receptors are mentioned in the context?"),
                      ("Which biomarker receptors does this passage mention?",)),
    "receptor_status": (("What is the status of the receptors in the given context?",
                         "Give the receptor status reported in the text."),
                        ("Were the receptors reported as positive or negative in this text?",)),
    "tumor_laterality": (("Which side is the tumor on according to the context?",
                          "What is the laterality of the tumor in the given text?"),
                         ("State the laterality of the lesion in this text.",)),
    "cancer_stage": (("What stage is reported in the given context?", "Extract the cancer stage from the text."),
                     ("Extract the TNM or overall stage from the passage.",)),
    "tumor_site": (("Where is the tumor located in the given context?", "What is the tumor site in the text?"),
                   ("Name the anatomic location of the lesion in the sentence.",)),
    "cancer_grade": (("What grade is reported for the tumor in this text?", "Identify the tumor grade in the text."),
                     ("What is the histologic grade stated in the passage?",)),
}
QUESTION_POOLS = {k: Pool(f"pheno.q.{k}", seen, held) for k, (seen, held) in PARAPHRASES.items()}
PHENO_CONTEXT = Pool("pheno.context", ("{s} {q}", "In the text {s2}, {q_lc}", "{s}\n{q}"),
                     ("Sentence: {s}\nQuestion: {q}", 'Given the text "{s}" - {q}'))
_SLOT_RE = re.compile(r"\{([A-Z]+)\}")


def question_text(w: Writer, etype: str) -> str:
    """The paper's Table 1 question most of the time, else a paraphrase (held-out ones only in test)."""
    if w.chance(0.5 if w.split == "test" else 0.6):
        w.used.add(f"pheno.q.{etype}#paper")
        return PAPER_QUESTIONS[etype]
    return w.pick(QUESTION_POOLS[etype])


def _slot_values(w: Writer, case: Case) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """Filled slots, entity answers per type, and entity types that must not be asked (ambiguous)."""
    vals: dict[str, str] = {"SPEC": distractor_size(w, case.size_cm), "AGE": str(case.age),
                            "SEX": w.choice(("f", "female")) if case.sex == "F" else w.choice(("m", "male")),
                            "SURG": case.surgery, "H": hist_phrase(w, case), "S": size_phrase(w, case.size_cm)}
    vals["MARGIN"] = f"margins negative, closest margin 0.{w.rng.randint(1, 9)} cm ({w.choice(('anterior', 'deep'))})"
    if case.has_tnm:
        k = positive_nodes(w.rng, case)
        vals["LN"] = (f"{k}/{k + w.rng.randint(1, 4)} lymph nodes positive for metastatic carcinoma" if k
                      else f"sentinel lymph nodes negative (0/{w.rng.randint(1, 4)})")
    ans: dict[str, list[str]] = {"histological_type": [vals["H"]], "tumor_size": [vals["S"]]}
    site, site_ans, side_ans = site_phrase(w, case)
    vals["SITE"] = site
    ans["tumor_site"] = [site_ans]
    skip = {"cancer_grade"} if case.key == "ovary" else set()
    if side_ans:
        ans["tumor_laterality"] = [side_ans]
    elif case.side or re.search(r"\b(left|right)\b", site, re.I):  # e.g. 'RUL', 'right hepatic lobe'
        skip.add("tumor_laterality")
    if (g := grade_phrase(w, case)) is not None:
        vals["G"], ans["cancer_grade"] = g[0], [g[1]]
    if (st := stage_phrase(w, case)) is not None:
        vals["STAGE"], ans["cancer_stage"] = st
    if (rc := receptor_phrase(w, case)) is not None:
        vals["REC"], ans["receptor_type"], ans["receptor_status"] = rc
    return vals, ans, skip


_SLOT_TYPES = {"H": ("histological_type",), "S": ("tumor_size",), "SITE": ("tumor_site", "tumor_laterality"),
               "G": ("cancer_grade",), "STAGE": ("cancer_stage",), "REC": ("receptor_type", "receptor_status")}


def phenotype_sentence(w: Writer, case: Case) -> tuple[str, str, dict[str, list[str]], set[str]]:
    """(sentence, source, answers per present entity type, types not to ask) for one case."""
    vals, ans, skip = _slot_values(w, case)
    options = [(vid, t) for vid, t in PHENO_SENTENCES.options(w.split)
               if all(s in vals for s in _SLOT_RE.findall(t)) and (case.prefix == "p" or "pathologic" not in t)]
    if "REC" in vals and w.chance(0.5):  # receptor sentences are common in breast reports (CancerNER)
        options = [(vid, t) for vid, t in options if "{REC}" in t]
    vid, template = w.choice(options)
    w.used.add(vid)
    text, source = template.split("|")
    text = text.format(**vals)
    slots = set(_SLOT_RE.findall(template))
    present = {t: ans[t] for s in slots for t in _SLOT_TYPES.get(s, ()) if t in ans}
    if w.chance(0.5):
        text, present = text.lower(), {t: [a.lower() for a in v] for t, v in present.items()}
    text = text[0].upper() + text[1:] if w.chance(0.3) else text
    # each answer as the sentence spells it (a capitalised first word too), in reading order
    present = {t: sorted((text[i:i + len(a)] for a in v for i in [text.lower().find(a.lower())]), key=text.find)
               for t, v in present.items()}
    return text, {"path": "pathology_report", "note": "clinical_note"}[source], present, skip


def phenotype_records(case: Case, split: str, seed: int, n_sentences: int = 3) -> list[dict]:
    """Every present entity type of each sentence is asked, plus one type that is not there ('Not relevant')."""
    out: list[dict] = []
    for i in range(n_sentences):
        w = Writer(random.Random(f"{seed}:{case.pid}:pheno:{i}"), split)
        sentence, source, present, skip = phenotype_sentence(w, case)
        absent = [t for t in ENTITY_TYPES if t not in present and t not in skip]
        asked = [t for t in ENTITY_TYPES if t in present] + ([w.choice(absent)] if absent else [])
        for etype in asked:
            qw = Writer(random.Random(f"{seed}:{case.pid}:pheno:{i}:{etype}"), split)
            q = question_text(qw, etype)
            context = qw.pick(PHENO_CONTEXT, s=sentence, s2=sentence.rstrip("."), q=q, q_lc=q[0].lower() + q[1:])
            answer = ", ".join(present[etype]) if etype in present else NOT_RELEVANT
            out.append(_record("phenotype", case, split, len(out), context, answer,
                               "not_relevant" if etype not in present else etype, sorted(w.used | qw.used),
                               question=q, entity_type=etype, source=source, sentence=sentence))
    return out


def _record(task: str, case: Case, split: str, k: int, context: str, response: str, answer_type: str,
            templates: list[str], **extra: object) -> dict:
    """One instruction record with the shared schema."""
    rec = {"id": f"{task}-{case.pid}-{k}", "patient_id": case.pid, "task": task, "split": split,
           "instruction": INSTRUCTIONS[task], "context": context, "response": response,
           "cancer_type": case.key, "answer_type": answer_type, "templates": templates}
    rec.update(extra)
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Clinical notes: the nine sections
# ----------------------------------------------------------------------------------------------------------------

RFV = {
    "consult": P("rfv.consult", ("new patient consult - {finding}", "consultation re: newly diagnosed {finding}",
                                 "new pt eval, referred for {finding}"), ("initial oncology visit for {finding}",)),
    "chemo": P("rfv.chemo", ("C{c}D1 {reg}", "cycle {c} day 1 {reg}", "f/u prior to cycle {c} of {reg}"),
               ("pre-treatment visit, {reg} cycle {c}",)),
    "radiation": P("rfv.rt", ("on-treatment visit (OTV), fx {k}/{n}", "weekly OTV - {k} of {n} fractions"),
                   ("radiation status check, fraction {k} of {n}",)),
    "surveillance": P("rfv.surv", ("surveillance visit", "routine f/u", "{mo} month follow up"),
                      ("survivorship check-in",)),
    "progression": P("rfv.prog", ("f/u after restaging scans", "review of restaging imaging"),
                     ("discussion of recent scans",)),
}
HISTORY = P("hist", ("{hist} of the {site}", "{site} mass, bx showed {hist}", "hx of {hist}, {site} primary"),
            ("biopsy-proven {hist} involving the {site}", "{hist} arising in the {site}"))
MET_POS = {
    "brain": P("met+.brain", ("MRI brain: {k} enhancing lesion(s), largest {x} cm, c/w metastases",
                              "MRI brain with new ring-enhancing lesion(s) concerning for mets"),
               ("brain imaging demonstrates {k} new intracranial metastatic deposits",)),
    "bone": P("met+.bone", ("bone scan: multiple foci of uptake including the {bone}, c/w osseous mets",
                            "CT shows lytic lesions in the {bone}, c/w metastatic disease"),
              ("PET: osseous metastatic disease involving the {bone}",)),
    "liver": P("met+.liver", ("CT A/P: multiple hypodense hepatic lesions, largest {x} cm, c/w liver mets",
                              "new liver lesions on CT, c/w mets"), ("hepatic metastases noted on cross-sectional "
                                                                     "imaging, largest {x} cm",)),
    "lung": P("met+.lung", ("CT chest: numerous bilateral pulmonary nodules c/w metastases",
                            "multiple new lung nodules, largest {x} cm, c/w mets"),
              ("innumerable pulmonary metastatic nodules on chest CT",)),
    "adrenal": P("met+.adrenal", ("{x} cm FDG-avid adrenal mass c/w metastasis",),
                 ("adrenal metastasis ({x} cm) on PET",)),
    "peritoneal": P("met+.peritoneal", ("CT A/P with peritoneal carcinomatosis and small volume ascites",
                                        "omental caking c/w peritoneal mets"), ("diffuse peritoneal "
                                                                                "implants on CT",)),
    "nodal": P("met+.nodal", ("PET with FDG-avid retroperitoneal lymphadenopathy c/w nodal mets",),
               ("distant nodal metastases in the para-aortic chain",)),
}
MET_NEG = {
    "brain": P("met-.brain", ("MRI brain negative for intracranial mets", "no brain mets on MRI"),
               ("brain imaging without evidence of intracranial disease",)),
    "bone": P("met-.bone", ("bone scan without evidence of osseous mets", "no suspicious bony lesions"),
              ("skeleton free of metastatic disease",)),
    "liver": P("met-.liver", ("no suspicious hepatic lesions", "liver unremarkable on CT"),
               ("no hepatic metastases identified",)),
    "lung": P("met-.lung", ("no pulmonary nodules", "lungs clear on CT chest"), ("no lung metastases seen",)),
    "adrenal": P("met-.adrenal", ("adrenals unremarkable",), ("no adrenal lesion",)),
}
NOTE_STAGE = P("note.stage", ("Stage: {t} {n} {m}{grp}", "staged as {compact}{grp}", "TNM: {t} {n} {m}{grp}"),
               ("per tumor board, {t}, {n}, {m}{grp}", "{system}: {t} {n} {m}{grp}"))
SYMPTOM_TEXT = {
    "nausea": ("reports nausea on days 2-3 after treatment", "c/o intermittent nausea", "some nausea, eating less"),
    "fatigue": ("fatigue is {adj}", "feels tired, napping during the day", "c/o fatigue"),
    "pain": ("pain in the {where}, rated {p}/10", "ongoing {where} pain {p}/10"),
    "neuropathy": ("tingling in fingertips and toes", "numbness in both hands, dropping things"),
    "diarrhea": ("loose stools 3-4x/day", "c/o diarrhea"),
    "dermatitis": ("skin in the treatment field is itchy", "redness in the radiation field"),
    "esophagitis": ("painful swallowing with solids", "odynophagia"),
}
PERTINENT_NEG = ("denies fevers or chills", "denies headaches or vision changes", "no cough or shortness of breath",
                 "denies chest pain", "no bleeding", "appetite fair", "sleeping ok")


def pain_score(grade: int) -> int:
    return {1: 3, 2: 6, 3: 8}[grade]


def reason_text(w: Writer, case: Case) -> str:
    finding = f"{case.cancer.organ or case.sub} mass" if w.chance(0.5) else f"abnormal {imaging_word(case)}"
    return w.pick(RFV[case.phase], finding=finding, c=case.cycle, reg=case.regimen.upper() if w.chance(0.3)
                  else case.regimen, k=case.rt_fraction, n=case.rt.fx, mo=w.choice((3, 6, 12)))


def imaging_word(case: Case) -> str:
    return {"breast": "mammogram", "prostate": "psa", "brain": "mri brain", "melanoma": "skin lesion",
            "cervix": "pap smear", "colorectal": "colonoscopy"}.get(case.key, "ct")


def treatment_site_text(w: Writer, case: Case) -> str:
    if case.phase == "radiation":
        return f"{case.rt.target}, {case.rt.dose:g} Gy in {case.rt.fx} fx ({case.rt.modality})"
    return {"consult": "n/a (consult)", "surveillance": w.choice(("none, off treatment", "n/a - surveillance")),
            }.get(case.phase, w.choice(("systemic therapy - n/a", "infusion center", "n/a")))


def subjective_text(w: Writer, case: Case) -> str:
    site, _, _ = site_phrase(w, case)
    hist = hist_phrase(w, case)
    sex = w.choice(("F", "female", "woman")) if case.sex == "F" else w.choice(("M", "male", "man"))
    parts = [f"{case.age} yo {sex} with " + w.pick(HISTORY, hist=hist, site=site) + "."]
    if case.surgery_done:
        parts.append(w.choice(("s/p {s} {k} wks ago.", "underwent {s} {k} weeks ago, recovered well."))
                     .format(s=case.surgery, k=w.rng.randint(3, 30)))
    parts.append(_phase_story(w, case))
    for name, g in case.symptoms.items():
        if name == "dermatitis" and g == 0:
            continue
        txt = w.choice(SYMPTOM_TEXT[name]).format(adj=("mild", "moderate", "limiting ADLs")[g - 1],
                                                  where=w.choice(("low back", "right hip", "abdomen", "chest wall")),
                                                  p=pain_score(g))
        parts.append(txt + ".")
    parts += [n + "." for n in w.rng.sample(PERTINENT_NEG, 2)]
    return " ".join(parts)


def _phase_story(w: Writer, case: Case) -> str:
    if case.phase == "chemo":
        return w.choice(("Here for cycle {c} of {r}.", "Presents prior to C{c} of {r}, tolerating treatment ok."))\
            .format(c=case.cycle, r=case.regimen)
    if case.phase == "radiation":
        conc = f" with concurrent {chemo}" if (chemo := concurrent_regimen(case)) else ""
        return f"Receiving radiation to the {case.rt.target}{conc}; {case.rt_fraction} of {case.rt.fx} fx completed."
    if case.phase == "surveillance":
        return f"Completed treatment {w.rng.randint(4, 30)} months ago, here for surveillance."
    if case.phase == "progression":
        return f"Was on {case.regimen}; recent scans concerning for progression."
    return "Referred after workup." if case.staging_done else "Referred after workup; staging not yet complete."


def concurrent_regimen(case: Case) -> str:
    """The chemo given with the radiation course under way, if any (as its plan and cue call for)."""
    return case.rt.chemo if case.phase == "radiation" else ""


ROS_ITEMS = {"pain": "Pain", "nausea": "Nausea", "fatigue": "Fatigue", "neuropathy": "Neuropathy",
             "diarrhea": "Diarrhea", "dermatitis": "Skin (RT field)", "esophagitis": "Esophagitis"}


def ros_text(w: Writer, case: Case) -> str:
    items = []
    for name, label in ROS_ITEMS.items():
        g = case.symptoms.get(name, 0)
        if name == "pain":
            items.append(f"{label}: {pain_score(g) if g else 0}/10")
        elif g:
            items.append(f"{label}: grade {g}")
        elif name in ("nausea", "fatigue", "neuropathy", "diarrhea") or case.phase == "radiation":
            items.append(f"{label}: {w.choice(('denies', 'none', 'no'))}")
    items += [f"Appetite: {w.choice(('good', 'fair', 'poor'))}", f"Distress: {w.rng.randint(0, 7)}/10",
              f"Fall risk: {w.choice(('low', 'low', 'moderate'))}"]
    sep = w.choice(("\n", "; ", ". "))
    return sep.join(items)


def imaging_lines(w: Writer, case: Case) -> list[str]:
    """Metastasis findings and negated distractors (the diagnosis must use only the positive ones)."""
    if case.phase == "consult" and not case.staging_done:
        return ["PET/CT not yet obtained."]
    lines = [w.pick(MET_POS[s], k=case.extras.get("brain_lesions", ""), bone=case.extras.get("bone_site", ""),
                    x=case.extras["brain_largest"] if s == "brain" else f"{w.rng.uniform(0.6, 3.5):.1f}")
             for s in case.mets]
    negatives = [s for s in MET_NEG if s not in case.mets and s != case.key]
    lines += [w.pick(MET_NEG[s]) for s in w.rng.sample(negatives, min(len(negatives), w.rng.randint(1, 2)))]
    w.rng.shuffle(lines)
    return [x[0].upper() + x[1:] + "." for x in lines]


def staging_line(w: Writer, case: Case) -> str:
    if not case.has_tnm:
        return (f"Path: glioblastoma IDH-wildtype, WHO grade 4, MGMT {w.choice(('methylated', 'unmethylated'))}.")
    t, n, m = tnm_parts(case)
    grp = f", stage {case.stage}" if w.chance(0.7) else ""
    compact = f"{t}{n[1:]}{m[1:]}"
    return w.pick(NOTE_STAGE, t=t, n=n, m=m, grp=grp, compact=compact, system=stage_system(case)) + "."


def objective_text(w: Writer, case: Case) -> str:
    vit = (f"BP {w.rng.randint(102, 158)}/{w.rng.randint(60, 94)}, HR {w.rng.randint(58, 104)}, "
           f"T {w.rng.uniform(36.2, 37.6):.1f}, SpO2 {w.rng.randint(92, 100)}% RA, wt {w.rng.uniform(48, 112):.1f} kg")
    parts = [vit + ".", f"ECOG {case.ecog}."]
    if case.phase == "radiation" and case.symptoms.get("dermatitis"):
        g = case.symptoms["dermatitis"]
        parts.append(f"RT field: grade {g} dermatitis{' with moist desquamation' if g == 2 else ', dry erythema'}.")
    parts += imaging_lines(w, case)
    parts.append(staging_line(w, case))
    if (rc := receptor_phrase(w, case)) is not None:
        parts.append(f"Receptors: {rc[0]}.")
    if case.key == "head_neck":
        parts.append(f"p16 {case.extras['p16']}.")
    if case.key == "prostate":
        a, b = case.gleason
        parts.append(f"Biopsy: Gleason {a}+{b}={a + b}.")
    return " ".join(parts)


LAB_FORMS = P("labs", ("inline", "lines"), ("slash",))


def labs_text(w: Writer, case: Case) -> str:
    lab = case.labs
    vals = [("WBC", lab["wbc"]), ("ANC", lab["anc"]), ("Hgb", lab["hgb"]), ("Plt", lab["plt"]), ("Cr", lab["cr"]),
            ("AST", lab["ast"]), ("ALT", lab["alt"])]
    if case.cancer.marker:
        prior = round(case.marker_value * (0.6 if case.marker_rising else 1.3), 1)
        vals.append((case.cancer.marker.upper(), f"{case.marker_value} (prior {prior})"))
    form = w.pick(LAB_FORMS)
    if form == "inline":
        return ", ".join(f"{k} {v}" for k, v in vals)
    if form == "lines":
        return "\n".join(f"{k}: {v}" for k, v in vals)
    return " / ".join(f"{k} {v}" for k, v in vals)


def diagnosis_text(case: Case) -> str:
    """The gold diagnosis, in the short lower-case style of the paper's examples (no commas)."""
    if case.m:
        return f"metastatic {case.dx_name} with {' and '.join(case.mets)} mets"
    compact = f"t{case.t}n{case.n}m0"
    if not case.has_tnm:
        base = "gbm idh-wildtype who grade 4"
    elif case.key == "prostate":
        a, b = case.gleason
        base = f"prostate adenocarcinoma gleason {a}+{b}={a + b} {compact}"
    elif case.key == "breast":
        rec = "/".join(f"{r.lower()}{'+' if s == 'positive' else '-'}" for r, s in case.receptors.items()
                       if r != "HER2")
        her2 = {"positive": "her2+", "negative": "her2-", "equivocal": "her2 equivocal"}[case.receptors["HER2"]]
        base = f"stage {case.stage.lower()} {case.side} breast {case.hist_abbrev} {rec} {her2}"
    elif case.key == "lung":
        base = f"{'sclc' if case.hist_abbrev == 'sclc' else 'nsclc'} {compact}"
    elif case.cancer.abbrev:
        base = f"{case.cancer.abbrev} {compact}"
    else:
        base = f"stage {case.stage.lower()} {case.dx_name}"
    return base + (f" s/p {case.surgery}" if case.surgery_done else "")


def assessment_text(w: Writer, case: Case) -> str:
    head = f"{case.age}{case.sex} with {diagnosis_text(case)}"
    story = {"consult": "newly diagnosed" + ("" if case.staging_done else ", staging incomplete"),
             "chemo": f"on {case.regimen}, due for C{case.cycle}",
             "radiation": f"receiving {case.rt.dose:g} Gy/{case.rt.fx} fx, {case.rt_fraction} fx completed",
             "surveillance": "NED on surveillance" + (f", {case.cancer.marker} trending up" if case.marker_rising
                                                     and case.cancer.marker else ""),
             "progression": f"with progression on {case.regimen}; options discussed include {case.next_regimen}"}
    issues = [f"grade {g} {s}" for s, g in case.symptoms.items() if g >= 2]
    extra = f" Active issues: {', '.join(issues)}." if issues else ""
    return f"{head}, {story[case.phase]}.{extra}"


# ----------------------------------------------------------------------------------------------------------------
# Task 3: the treatment plan, derived step by step from facts in the note
# ----------------------------------------------------------------------------------------------------------------

def _consult_steps(case: Case) -> list[str]:
    steps = ["reviewed pathology and imaging with patient and family"]
    if not case.staging_done:
        steps.append("obtain pet/ct for staging")
        if case.key == "lung":
            steps.append("mri brain to complete staging")
    steps.append("present at multidisciplinary tumor board")
    stage3 = case.stage.startswith("III")
    if case.key == "brain":
        steps.append("refer to neurosurgery for maximal safe resection")
    elif case.key == "prostate":
        steps.append("refer to radiation oncology to discuss definitive radiation")
    elif inoperable(case):
        steps.append("refer to radiation oncology for definitive radiation (not a surgical candidate)")
    elif stage3 and case.key in ("lung", "head_neck", "cervix", "esophagus"):
        steps.append(f"plan concurrent chemoradiation with {concurrent_chemo(case)}")
    elif case.rectal and (case.t[0] in "34" or case.n != "0"):
        rt = "long-course chemoradiation" if case.rt.chemo else "short-course radiation"
        steps.append(f"plan total neoadjuvant therapy with {rt} and {case.regimen}")
    elif stage3 and case.key in NEOADJUVANT_CHEMO:
        steps.append(f"plan neoadjuvant {case.regimen}")
    else:
        steps.append(f"refer to surgical oncology for {case.surgery}")
    steps.append("rtc in 2 weeks to review results and finalize plan")
    return steps


NEOADJUVANT_CHEMO = ("breast", "stomach", "pancreas", "bladder", "ovary")  # stage III gets chemotherapy first


def inoperable(case: Case) -> bool:
    """Whether the radiation cue rules surgery out."""
    return any(w in case.rt.cue for w in ("inoperable", "unresectable", "not a resection candidate"))


def concurrent_chemo(case: Case) -> str:
    """The chemotherapy given with definitive radiation (platinum doublets; no immunotherapy concurrently)."""
    if case.key == "lung" and case.hist_abbrev != "sclc":
        return "weekly carboplatin/paclitaxel"
    return case.regimen


def _symptom_steps(case: Case) -> list[str]:
    s, steps = case.symptoms, []
    if s.get("nausea") == 1:
        steps.append("continue ondansetron 8 mg q8h prn nausea")
    elif s.get("nausea", 0) >= 2:
        steps.append("add olanzapine 5 mg qhs for refractory nausea")
    if s.get("diarrhea"):
        steps.append("loperamide prn loose stools")
    if s.get("pain", 0) >= 2:
        steps.append("increase oxycodone to 10 mg q4h prn pain")
    return steps


def _chemo_steps(case: Case) -> list[str]:
    lab, reg, c = case.labs, case.regimen, case.cycle
    if lab["anc"] < 1.0:
        steps = [f"hold cycle {c} of {reg} for anc {lab['anc']}"]
    elif lab["plt"] < 75:
        steps = [f"hold cycle {c} of {reg} for platelets {lab['plt']}"]
    else:
        steps = [f"proceed with cycle {c} of {reg}"]
    if case.symptoms.get("neuropathy", 0) >= 2 and reg in NEUROTOXIC:
        steps.append(f"dose reduce {NEUROTOXIC[reg]} by 20% for grade {case.symptoms['neuropathy']} neuropathy")
    if lab["hgb"] < 8.0:
        steps.append(f"transfuse 1 unit prbc for hgb {lab['hgb']}")
    if lab["cr"] > 1.5:
        steps.append(f"switch cisplatin to carboplatin for creatinine {lab['cr']}" if "cisplatin" in reg
                     else "encourage oral hydration and recheck creatinine")
    steps += _symptom_steps(case)
    if c % 3 == 0:
        steps.append("restaging ct after this cycle")
    steps.append(f"rtc in {INTERVAL_WEEKS.get(reg, 3)} weeks with cbc and cmp")
    return steps


def low_counts(case: Case) -> list[str]:
    """Counts too low to continue radiation safely (Hgb < 8, platelets < 50, ANC < 1.0), as plan wording."""
    lab = case.labs
    return [f"{name} {lab[key]}" for key, name, limit in (("hgb", "hgb", 8.0), ("plt", "platelets", 50),
                                                          ("anc", "anc", 1.0)) if lab[key] < limit]


def _radiation_steps(case: Case) -> list[str]:
    rt, low = case.rt, low_counts(case)
    done = f"({case.rt_fraction} of {rt.fx} completed)"
    last = case.rt_fraction == rt.fx
    if low:
        steps = [f"radiation to the {rt.target} completed today {done}; {' and '.join(low)} noted" if last else
                 f"hold radiation to the {rt.target} {done} for {' and '.join(low)}"]
        if case.labs["hgb"] < 8.0:
            steps.append(f"transfuse 1 unit prbc for hgb {case.labs['hgb']}")
        steps.append("recheck cbc in 2 days" + ("" if last else " and resume radiation when counts recover"))
    else:
        steps = [f"continue {rt.dose:g} gy in {rt.fx} fractions to the {rt.target} {done}"]
    derm = case.symptoms.get("dermatitis", 0)
    if derm == 1:
        steps.append("reviewed routine skin care")
    elif derm >= 2:
        steps.append("silvadene to areas of moist desquamation")
    if case.symptoms.get("esophagitis"):
        steps.append("magic mouthwash swish and swallow qid prn")
    if case.symptoms.get("fatigue", 0) >= 2:
        steps.append("encouraged light daily exercise for fatigue")
    if conc := concurrent_regimen(case):
        steps.append(f"hold {conc} until counts recover" if low else f"continue {conc}")
    steps += _symptom_steps(case)
    if last:
        steps.append("eotv today; follow up in 4 weeks")
    elif not low:
        steps.append("weekly otv next week")
    return steps


def _surveillance_steps(case: Case) -> list[str]:
    marker = case.cancer.marker
    rising = case.marker_rising and marker
    steps = [f"{marker} rising to {case.marker_value}; obtain ct chest/abdomen/pelvis" if rising
             else "no evidence of recurrence on exam today"]
    maint = MAINTENANCE.get(case.key, "")
    if case.key == "breast" and case.age < 50:
        maint = "tamoxifen"  # an aromatase inhibitor alone is for postmenopausal women
    if maint and not (case.key == "breast" and case.receptors.get("ER") != "positive") and not (
            case.key == "prostate" and _prostate_low_risk(case)):  # low risk: no androgen deprivation
        steps.append(f"continue {maint}")
    months = 3 if case.stage.startswith("III") else 6
    if not rising:
        steps.append(f"repeat ct chest/abdomen/pelvis in {months} months")
    steps += _symptom_steps(case)
    steps.append(f"rtc in {months} months with labs")
    return steps


def _progression_steps(case: Case) -> list[str]:
    steps = [f"discussed progression of disease on {case.regimen}", f"switch to {case.next_regimen}"]
    if "brain" in case.mets:
        srs = int(case.extras["brain_lesions"]) <= 4
        steps.append(f"refer to radiation oncology for {'srs' if srs else 'whole brain radiation'} to brain lesions")
    if "bone" in case.mets:
        steps.append("start zoledronic acid every 12 weeks")
    steps += _symptom_steps(case)
    if case.ecog >= 2:
        steps.append("palliative care referral for symptom management")
    steps.append(f"rtc in 2 weeks for cycle 1 of {case.next_regimen}")
    return steps


def plan_steps(case: Case) -> list[str]:
    """The gold plan as a list of steps (no commas inside a step, so the evaluator sees one answer)."""
    return {"consult": _consult_steps, "chemo": _chemo_steps, "radiation": _radiation_steps,
            "surveillance": _surveillance_steps, "progression": _progression_steps}[case.phase](case)


def plan_text(case: Case) -> str:
    return "\n".join(f"{i}. {s}." for i, s in enumerate(plan_steps(case), 1))


# ----------------------------------------------------------------------------------------------------------------
# Documents: a clinical note (sections) and a pathology report
# ----------------------------------------------------------------------------------------------------------------

def note_sections(w: Writer, case: Case) -> dict[str, str]:
    """Bodies of all nine sections, misspellings sprinkled into the free-text ones."""
    return {"reason": reason_text(w, case), "site": treatment_site_text(w, case),
            "subjective": misspell(w, subjective_text(w, case)), "ros": misspell(w, ros_text(w, case)),
            "objective": objective_text(w, case), "labs": labs_text(w, case), "diagnosis": diagnosis_text(case),
            "assessment": misspell(w, assessment_text(w, case)), "plan": plan_text(case)}


def render_sections(w: Writer, bodies: dict[str, str], names: tuple[str, ...]) -> str:
    """Header + body per section; occasionally swaps two neighbouring sections as real templates do."""
    order = list(names)
    if w.chance(0.15) and "labs" in order and "objective" in order:
        i, j = order.index("objective"), order.index("labs")
        order[i], order[j] = order[j], order[i]
    sep = w.choice(("\n", "\n\n"))
    out = []
    for name in order:
        header = w.pick(HEADERS[name])
        glue = "\n" if "\n" in bodies[name] or w.chance(0.3) else " "
        out.append(f"{header}{glue}{bodies[name]}")
    return sep.join(out)


EXTRA_SECTIONS = (("PMH", ("HTN, HLD", "T2DM, CKD stage 2", "COPD, former smoker 30 pack-years", "GERD, OSA on CPAP",
                           "hypothyroidism", "none significant")),
                  ("Medications", ("reviewed and reconciled", "lisinopril, atorvastatin, ondansetron prn",
                                   "metformin, omeprazole", "oxycodone prn, senna, apixaban")),
                  ("Social", ("lives with spouse, retired", "former smoker, quit 10 yrs ago", "works part time, "
                                                                                          "never smoker")))


def clinical_note(w: Writer, case: Case) -> str:
    """A full note for the pretraining corpus: nine sections plus optional history sections."""
    bodies = note_sections(w, case)
    text = render_sections(w, bodies, SECTION_ORDER)
    extras = [f"{h}: {w.choice(opts)}" for h, opts in EXTRA_SECTIONS if w.chance(0.4)]
    if extras:
        head, _, rest = text.partition("\n")
        text = "\n".join([head] + extras + [rest])
    if w.chance(0.3):
        minutes = w.choice((25, 30, 40, 60))
        text += f"\n\nTime spent: {minutes} min, >50% counseling. Electronically signed by [provider]."
    return text


def pathology_report(w: Writer, case: Case) -> str:
    """Specimen, gross, microscopic and final diagnosis (histology, grade, size, receptors; for a resection also
    margins, lymph nodes and the pathologic pTNM stage, which a core needle biopsy cannot give)."""
    site, _, _ = site_phrase(w, case)
    resection = w.chance(0.6)
    proc = case.surgery if resection else "core needle biopsy"
    grade = grade_phrase(w, case)
    stage = stage_phrase(w, case, prefix="p") if resection else None
    rec = receptor_phrase(w, case)
    k = positive_nodes(w.rng, case)
    cores = w.rng.randint(2, 6)
    gross = (f"a specimen measuring {distractor_size(w, case.size_cm)}. Sectioning reveals a firm tan-white lesion "
             f"measuring {size_phrase(w, case.size_cm)}. Representative sections submitted in cassettes "
             f"A1-A{w.rng.randint(4, 12)}." if resection else
             f"{cores} tan-white cores of tissue, {w.rng.uniform(0.8, 2.0):.1f} cm in aggregate length. Entirely "
             "submitted in cassette A1.")  # a core is not measured as a tumour
    lines = [f"SPECIMEN: {site}, {proc}.",
             f"GROSS DESCRIPTION: Received in formalin labeled with the patient's name and '{site}', {gross}",
             "MICROSCOPIC DESCRIPTION: " + w.choice((
                 f"Sections show {hist_phrase(w, case)} growing in nests and sheets with desmoplastic stroma.",
                 f"The tumor is composed of infiltrating {hist_phrase(w, case)} with areas of necrosis.",
                 f"Sections demonstrate {hist_phrase(w, case)}; lymphovascular invasion "
                 f"{w.choice(('is present', 'is not identified'))}.")),
             "FINAL DIAGNOSIS:",
             f"- Histologic type: {case.histology[0]}",
             f"- Tumor size: {size_phrase(w, case.size_cm)}" if resection else
             f"- Tumor involves {w.rng.randint(1, cores)} of {cores} cores"]
    if resection:
        lines.append(f"- Margins: {w.choice(('negative', 'negative, closest 0.2 cm', 'positive (deep margin)'))}")
        if case.has_tnm:
            lines.append(f"- Lymph nodes: {k}/{k + w.rng.randint(1, 12)} positive")
    if grade:
        lines.insert(5, f"- Grade: {grade[0]}")
    if rec:
        lines.append(f"- Receptors: {rec[0]}")
    if stage:
        lines.append(f"- Pathologic stage: {stage[0]}")
    if w.chance(0.3):
        lines.append("COMMENT: Case reviewed at intradepartmental consensus conference.")
    return misspell(w, "\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Tasks 2-3 (diagnosis, plan) and the radiation-oncology tasks
# ----------------------------------------------------------------------------------------------------------------

DIAGNOSIS_SECTIONS = ("reason", "site", "subjective", "ros", "objective", "labs")
PLAN_SECTIONS = DIAGNOSIS_SECTIONS + ("diagnosis", "assessment")


def diagnosis_style(case: Case) -> str:
    """What kind of answer the diagnosis is (for the datasheet)."""
    if case.m:
        return "metastatic"
    if not case.has_tnm:
        return "who_grade"
    if case.key in ("prostate", "breast"):
        return {"prostate": "gleason_tnm", "breast": "stage_receptors"}[case.key]
    return "abbrev_tnm" if case.key == "lung" or case.cancer.abbrev else "stage_group"


def note_records(case: Case, split: str, seed: int) -> tuple[dict, dict]:
    """The diagnosis record (6 sections) and the treatment-plan record (8 sections) of one patient's note."""
    w = Writer(random.Random(f"{seed}:{case.pid}:note"), split)
    bodies = note_sections(w, case)
    dx_ctx = render_sections(w, bodies, DIAGNOSIS_SECTIONS)
    dx = _record("diagnosis", case, split, 0, dx_ctx, diagnosis_text(case), diagnosis_style(case), w.templates())
    w2 = Writer(random.Random(f"{seed}:{case.pid}:plan"), split)
    bodies2 = note_sections(w2, case)
    plan_ctx = render_sections(w2, bodies2, PLAN_SECTIONS)
    plan = _record("treatment_plan", case, split, 0, plan_ctx, plan_text(case), case.phase, w2.templates(),
                   n_steps=len(plan_steps(case)))
    return dx, plan


RADONC_FORMS = P("radonc", (
    "{system}stage {stage} ({tnm}) {SIDE}{hist} of the {site}{grade}{rec}. {age} yo {sex}. {cue}.{mets}",
    "{age}{sex1}, {hist}, {site}, {tnm}, stage {stage}{grade}{rec}. {cue}.{mets}",
    "{hist} - {site}. {tnm}{grade}{rec}. Age {age}. {cue}.{mets}",
), (
    "Dx: {hist} ({site}); {tnm}; stage {stage}{grade}{rec}; {age}-year-old {sex}; notes: {cue}.{mets}",
    "{site} primary, {hist}{grade}{rec}, {tnm}, {age} y/o {sex}. Clinical: {cue}.{mets}",
))
_PLURAL = {"photon": "photons", "proton": "protons", "electron": "electrons", "brachy": "hdr brachy"}


def regimen_text(rt: RadPlan) -> str:
    """The regimen in the style of the paper's example: ``plan 25 Gy/ 5 fx photons. primary, photon, 25.0Gy, ...``."""
    long = f"{rt.dose:.1f}" if rt.dose == int(rt.dose) else f"{rt.dose:g}"
    head = f"plan {rt.dose:g} Gy/ {rt.fx} fx {_PLURAL[rt.modality]}."
    return f"{head} primary, {rt.modality}, {long}Gy, fractions:{rt.fx}"


def radonc_context(w: Writer, case: Case) -> str:
    """Short diagnosis details (history, pathology, stage) as in a radiation-oncology consult, plan removed."""
    site, _, _ = site_phrase(w, case, clock=False)
    grade = grade_phrase(w, case)
    rec = receptor_phrase(w, case)
    t, n, m = tnm_parts(case) if case.has_tnm else ("", "", "")
    mets = f" Metastatic to {' and '.join(case.mets)}." if case.mets else ""
    text = w.pick(RADONC_FORMS, system=f"{stage_system(case)} " if case.has_tnm else "",
                  stage=case.stage or "n/a", tnm=f"{t} {n} {m}".strip() or "no TNM", SIDE="", hist=case.histology[0],
                  site=site, grade=f", {grade[0]}" if grade else "", rec=f", {rec[0]}" if rec else "", age=case.age,
                  sex={"F": "female", "M": "male"}[case.sex], sex1=case.sex, cue=case.rt.cue, mets=mets)
    if case.comorbidity and case.comorbidity not in text:
        text += f" PMH: {case.comorbidity}."
    if case.key == "head_neck":
        text += f" p16 {case.extras['p16']}."
    return text


def radonc_records(case: Case, split: str, seed: int) -> dict[str, dict]:
    """Regimen, modality and ICD-10 records sharing one rendering of the diagnosis details (none without a radiation
    indication)."""
    if not case.rt.fx:
        return {}
    w = Writer(random.Random(f"{seed}:{case.pid}:radonc"), split)
    ctx = radonc_context(w, case)
    kind = "palliative" if case.m else "definitive"
    return {
        "radonc_regimen": _record("radonc_regimen", case, split, 0, ctx, regimen_text(case.rt), kind, w.templates(),
                                  modality=case.rt.modality, dose_gy=case.rt.dose, fractions=case.rt.fx),
        "radonc_modality": _record("radonc_modality", case, split, 0, ctx, case.rt.modality, case.rt.modality,
                                   w.templates()),
        "radonc_icd10": _record("radonc_icd10", case, split, 0, ctx, case.icd, case.icd.split(".")[0],
                                w.templates(), icd10_category=case.icd.split(".")[0]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def patient_ids(n_patients: int) -> list[str]:
    return [f"P{i:06d}" for i in range(n_patients)]


def assign_splits(n_patients: int, seed: int = 0) -> dict[str, str]:
    """Patient id -> split, exactly round(80%) / round(10%) / rest, shuffled by ``seed``."""
    ids = patient_ids(n_patients)
    random.Random(f"{seed}:splits").shuffle(ids)
    n_train, n_val = round(0.8 * n_patients), round(0.1 * n_patients)
    split_of = {pid: "train" for pid in ids[:n_train]}
    split_of.update({pid: "val" for pid in ids[n_train:n_train + n_val]})
    split_of.update({pid: "test" for pid in ids[n_train + n_val:]})
    return split_of


def instruction_datasets(n_patients: int, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """``{task: {split: records}}`` for the six tasks; a patient's records all go to one split."""
    data: dict[str, dict[str, list[dict]]] = {t: {s: [] for s in SPLITS} for t in TASKS}
    split_of = assign_splits(n_patients, seed)
    cases = {pid: draw_case(pid, seed) for pid in patient_ids(n_patients)}
    for split in ("val", "test"):  # a tiny split of patients without radiation would leave radonc files empty
        pids = [p for p, s in split_of.items() if s == split]
        donor = next((p for p, s in split_of.items() if s == "train" and cases[p].rt.fx), None)
        if pids and donor and not any(cases[p].rt.fx for p in pids):
            split_of[donor], split_of[pids[0]] = split, "train"
    for pid, case in cases.items():
        split = split_of[pid]
        data["phenotype"][split] += phenotype_records(case, split, seed)
        dx, plan = note_records(case, split, seed)
        data["diagnosis"][split].append(dx)
        data["treatment_plan"][split].append(plan)
        for task, rec in radonc_records(case, split, seed).items():
            data[task][split].append(rec)
    return data


def pretrain_documents(n: int, seed: int = 0) -> list[dict]:
    """``n`` unlabelled documents, clinical notes and pathology reports about 5:1, of patients not in the tasks."""
    docs = []
    for i in range(n):
        pid = f"U{i:07d}"
        case = draw_case(pid, seed)
        w = Writer(random.Random(f"{seed}:{pid}:doc"), "any")
        if w.chance(1 / 6):
            docs.append({"text": pathology_report(w, case), "source": "pathology_report"})
        else:
            docs.append({"text": clinical_note(w, case), "source": "clinical_note"})
    return docs


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_atomic(path: str, text: str) -> None:
    """``run_io.write_text_atomic`` into a folder made if needed."""
    from cancerllm_jax.train.run_io import write_text_atomic

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, text)


def _table(title: str, rows: dict[str, Counter], cols: tuple[str, ...]) -> list[str]:
    out = [f"### {title}", "", "| | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 2) + "|"]
    for name in sorted(rows):
        counts = rows[name]
        out.append(f"| {name} | " + " | ".join(str(counts.get(c, 0)) for c in cols) + f" | {sum(counts.values())} |")
    return out + [""]


ABBREVIATIONS = ("mets", "s/p", "c/w", "RUL", "LLL", "UOQ", "idc", "otv", "prbc")


def realism_claims(texts: list[str]) -> tuple[list[str], list[str]]:
    """(abbreviations, misspellings) that really occur in ``texts``, so the datasheet claims only what is there."""
    words = set(re.findall(r"[A-Za-z/]+", "\n".join(texts)))
    return [a for a in ABBREVIATIONS if a in words], [m for m in MISSPELLINGS.values() if m in words]


def datasheet(data: dict[str, dict[str, list[dict]]], docs: list[dict], n_patients: int, seed: int) -> str:
    """DATA.md: what the data is, how it was made, and counts per task, split, cancer type and answer type."""
    texts = [d["text"] for d in docs] + [r["context"] for t in TASKS for s in SPLITS for r in data[t][s]]
    abbrevs, typos = realism_claims(texts)
    no_rt = sum(len(data["diagnosis"][s]) - len(data["radonc_regimen"][s]) for s in SPLITS)
    lines = [
        "# Synthetic CancerLLM data (datasheet)", "",
        f"Generated by `cancerllm_jax.data.synthetic` with seed {seed} for {n_patients} synthetic patients. "
        "Everything is invented: no real patient, name, date or identifier appears (dates are relative, providers are "
        "`[provider]`). The same seed gives byte-identical files.", "",
        "## How it is made",
        "- Each patient is a structured case (one of 17 cancer types; site, laterality, histology, grade, size, TNM, "
        "metastases, receptors, treatment phase, labs, symptoms, radiation plan). Text is rendered from the case; "
        "answers are derived from it by fixed rules, so they are read from (or inferred from) the context.",
        "- Splits are by patient (80/10/10): no patient appears in two splits. Train and val use the `seen` "
        "phrasings; test uses held-out section headers, sentence templates, finding phrasings, question paraphrases "
        "and context layouts (record field `templates`: `#s` seen, `#t` held out, `#c` common, `#paper` the paper's "
        "Table 1 questions, used in every split).",
        "- Phenotype: sentence + question -> entity span(s) copied from the sentence, comma-separated, or "
        "`Not relevant`. Q3 of Table 1 asks for receptor names (`receptor_type`); Q4 ('receptor type') is used for "
        "the receptor *status* entity. Distractors: specimen sizes, margins, node counts, 'metastatic carcinoma'.",
        "- Diagnosis: 6 sections -> diagnosis. Metastases must be read from imaging lines that also contain negated "
        "sites; TNM is written with prefixes (cT2a cN0 cM0) but answered compactly (t2an0m0); the stage group is "
        "sometimes absent and follows the AJCC 8th edition tables for breast and lung, one generic T/N/M rule for the "
        "other types (labelled AJCC or FIGO without an edition).",
        "- Treatment plan: 8 sections -> numbered steps derived from phase, labs (chemotherapy: ANC < 1.0, "
        "platelets < 75, Hgb < 8, creatinine > 1.5; radiation is held for Hgb < 8, platelets < 50 or ANC < 1.0), "
        "symptom grades, regimen and tumor-marker trend.",
        "- Radiation oncology: short diagnosis details -> regimen (`plan 25 Gy/ 5 fx photons. primary, photon, "
        "25.0Gy, fractions:5`), modality (photon/proton/electron/brachy) and the ICD-10 code of the primary. "
        f"Patients without a radiation indication have none of these records ({no_rt} here: colon, not rectal, "
        "primaries other than a resected T4 tumour fixed to a neighbouring structure).",
        "- Pretraining corpus: clinical notes and pathology reports (about 5:1) of other synthetic patients; it may "
        "use both seen and held-out phrasings (unlabelled text), which is where domain pretraining can help.",
        f"- Notes contain abbreviations ({', '.join(abbrevs) or 'none in this sample'}), receptor shorthand and "
        f"occasional misspellings ({', '.join(repr(m) for m in typos) or 'none in this sample'}); gold responses are "
        "spelled correctly.", "",
        "## Counts", "",
    ]
    task_split = {t: Counter({s: len(r) for s, r in data[t].items()}) for t in TASKS}
    lines += _table("Records per task and split", task_split, SPLITS)
    by_type = {t: Counter(r["cancer_type"] for s in SPLITS for r in data[t][s]) for t in TASKS}
    cancer_rows = {c.key: Counter({t: by_type[t].get(c.key, 0) for t in TASKS}) for c in CANCERS}
    lines += _table("Records per cancer type and task", cancer_rows, TASKS)
    for t in TASKS:
        rows: dict[str, Counter] = {}
        for s in SPLITS:
            for r in data[t][s]:
                rows.setdefault(r["answer_type"], Counter())[s] += 1
        lines += _table(f"Answer types: {t}", rows, SPLITS)
    src = Counter(d["source"] for d in docs)
    chars = sum(len(d["text"]) for d in docs)
    lines += ["## Pretraining corpus", "", f"{len(docs)} documents ({src.get('clinical_note', 0)} clinical notes, "
              f"{src.get('pathology_report', 0)} pathology reports), {chars} characters.", ""]
    return "\n".join(lines)


INCOMPLETE = ".incomplete"  # in a folder write_dataset is writing, or stopped writing


def write_dataset(out_dir: str, n_patients: int, seed: int = 0, n_pretrain_docs: int | None = None,
                  overwrite: bool = False) -> dict:
    """Write ``pretrain/corpus.jsonl``, ``<task>/{train,val,test}.jsonl`` and ``DATA.md``; return the counts.

    Refuses a non-empty ``out_dir`` unless ``overwrite``, or unless it holds the ``INCOMPLETE`` marker a write of
    this function that stopped part-way (disk full, a kill) left; each file is written atomically and ``DATA.md``
    last (an old one is removed first, the marker after it), so a folder without it is incomplete.
    """
    from cancerllm_jax.errors import UserError

    if n_patients < 10:
        raise UserError(f"n_patients must be at least 10 for an 80/10/10 split (got {n_patients})")
    if not str(out_dir).strip():
        raise UserError("the output folder is empty: name a folder (an empty name would write into the current one)")
    if n_pretrain_docs is not None and n_pretrain_docs < 1:  # an empty corpus: pretraining refuses it later
        raise UserError(f"n_pretrain_docs must be at least 1 (got {n_pretrain_docs}); None gives 5 per patient")
    unfinished = os.path.isfile(os.path.join(out_dir, INCOMPLETE))  # an earlier write of ours that stopped part-way
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite and not unfinished:
        raise UserError(f"{out_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder")
    n_docs = 5 * n_patients if n_pretrain_docs is None else n_pretrain_docs
    data = instruction_datasets(n_patients, seed)
    docs = pretrain_documents(n_docs, seed)
    if os.path.exists(os.path.join(out_dir, "DATA.md")):  # written last: an interrupted overwrite must not look done
        os.remove(os.path.join(out_dir, "DATA.md"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, INCOMPLETE), "w", encoding="utf-8") as f:
        f.write("make_synthetic_data.py is writing (or stopped part-way): running it again completes this folder\n")
    _write_atomic(os.path.join(out_dir, "pretrain", "corpus.jsonl"), _jsonl(docs))
    for task in TASKS:
        for split in SPLITS:
            _write_atomic(os.path.join(out_dir, task, f"{split}.jsonl"), _jsonl(data[task][split]))
    _write_atomic(os.path.join(out_dir, "DATA.md"), datasheet(data, docs, n_patients, seed))
    os.remove(os.path.join(out_dir, INCOMPLETE))
    counts: dict = {"pretrain": len(docs), "n_patients": n_patients, "seed": seed}
    counts.update({t: {s: len(data[t][s]) for s in SPLITS} for t in TASKS})
    return counts
