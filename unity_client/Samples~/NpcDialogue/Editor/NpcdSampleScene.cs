using UnityEditor;
using UnityEditor.SceneManagement;
using UnityEngine;
using UnityEngine.UI;

/// <summary>Tools → npcd → Create Sample Scene: builds the sample's scene in the project's own Unity
/// version (a camera and a light, an NpcdConnection, a guard with an NpcSpeaker and AskOnKey, and a
/// speech bubble on a screen-space canvas), then asks where to save it. The scene is made by code
/// rather than shipped as a .unity file: a scene serialized by one Unity version does not open cleanly
/// in older ones, and this one is the same five objects in every version from 2021.3 on.</summary>
static class NpcdSampleScene
{
    [MenuItem("Tools/npcd/Create Sample Scene")]
    static void Create()
    {
        if (!EditorSceneManager.SaveCurrentModifiedScenesIfUserWantsTo()) return;
        var path = EditorUtility.SaveFilePanelInProject("Save the npcd sample scene", "NpcDialogue", "unity",
                                                        "Where to save the sample scene");
        if (string.IsNullOrEmpty(path)) return;
        var scene = EditorSceneManager.NewScene(NewSceneSetup.DefaultGameObjects, NewSceneMode.Single);

        new GameObject("npcd").AddComponent<NpcdConnection>();  // address 127.0.0.1:50051: `npcd serve`

        var canvasObject = new GameObject("Canvas", typeof(Canvas), typeof(CanvasScaler), typeof(GraphicRaycaster));
        canvasObject.GetComponent<Canvas>().renderMode = RenderMode.ScreenSpaceOverlay;
        var scaler = canvasObject.GetComponent<CanvasScaler>();
        scaler.uiScaleMode = CanvasScaler.ScaleMode.ScaleWithScreenSize;
        scaler.referenceResolution = new Vector2(1280, 720);

        var bubbleObject = new GameObject("Speech bubble", typeof(RectTransform), typeof(Image));
        bubbleObject.transform.SetParent(canvasObject.transform, false);
        var bubbleRect = bubbleObject.GetComponent<RectTransform>();
        bubbleRect.anchorMin = new Vector2(0.1f, 0.05f);
        bubbleRect.anchorMax = new Vector2(0.9f, 0.3f);
        bubbleRect.offsetMin = bubbleRect.offsetMax = Vector2.zero;
        bubbleObject.GetComponent<Image>().color = new Color(0f, 0f, 0f, 0.6f);

        var textObject = new GameObject("Text", typeof(RectTransform), typeof(Text));
        textObject.transform.SetParent(bubbleObject.transform, false);
        var textRect = textObject.GetComponent<RectTransform>();
        textRect.anchorMin = Vector2.zero;
        textRect.anchorMax = Vector2.one;
        textRect.offsetMin = new Vector2(16f, 12f);
        textRect.offsetMax = new Vector2(-16f, -12f);
        var label = textObject.GetComponent<Text>();
#if UNITY_2022_2_OR_NEWER
        label.font = Resources.GetBuiltinResource<Font>("LegacyRuntime.ttf");
#else
        label.font = Resources.GetBuiltinResource<Font>("Arial.ttf");
#endif
        label.fontSize = 28;
        label.color = Color.white;
        label.alignment = TextAnchor.UpperLeft;

        var bubble = bubbleObject.AddComponent<SpeechBubble>();
        bubble.label = label;
        bubbleObject.SetActive(false);  // SpeechBubble.Show activates it when a line starts

        var guard = GameObject.CreatePrimitive(PrimitiveType.Capsule);
        guard.name = "Town guard";
        guard.transform.position = new Vector3(0f, 1f, 0f);
        var speaker = guard.AddComponent<NpcSpeaker>();
        speaker.persona = "town_guard";
        speaker.npcId = "guard-1";
        speaker.conversation = "guard-1";  // the daemon remembers what the player said
        speaker.bubble = bubble;
        guard.AddComponent<AskOnKey>().npc = speaker;  // press E in Play mode

        EditorSceneManager.MarkSceneDirty(scene);
        if (EditorSceneManager.SaveScene(scene, path))
            Debug.Log("npcd sample scene saved to " + path + ": start `npcd serve`, press Play, then E");
    }
}
